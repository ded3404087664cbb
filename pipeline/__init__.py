"""medpipe: a medical imaging pipeline for radiology research.

Stages: preprocess, train, evaluate, predict, report; each one is a plain ``run_<stage>(config)``
function that the CLI (``medpipe``), the tests and the benchmarks all call.
"""

__version__ = "0.1.0"
