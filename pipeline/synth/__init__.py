"""Synthetic chest CT phantoms: the project's embedded default dataset.

``generate_case`` makes one case in memory; ``write_cohort`` writes a folder of cases with a
manifest. See ``phantom`` (acquisition and geometry), ``anatomy`` (the anatomy model) and ``lung``
(vessels and lesions).
"""

from pipeline.synth.cohort import LABEL_NAMES, write_cohort
from pipeline.synth.phantom import ORIENTATIONS, PhantomCase, generate_case

__all__ = ["LABEL_NAMES", "ORIENTATIONS", "PhantomCase", "generate_case", "write_cohort"]
