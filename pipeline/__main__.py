"""``python -m pipeline`` runs the medpipe command line."""

import sys

from pipeline.cli import entry

sys.exit(entry())
