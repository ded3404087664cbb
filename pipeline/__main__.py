"""``python -m pipeline`` runs the medpipe command line."""

import sys

from pipeline.cli import main

sys.exit(main())
