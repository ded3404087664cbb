"""``medpipe demo``: every stage on a generated phantom cohort, into one run folder.

The cohort is written to ``RUN/cohort`` and each stage to its usual place under ``RUN``; a rerun
resumes (finished cases are skipped). ``quick`` is the small variant the tests use.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.synth import write_cohort

__all__ = ["demo_config", "run_demo"]


def demo_config(run: Path, quick: bool) -> Config:
    """The demo's config: small CT cubes for the classifier, lungs kept for segmentation."""
    return load_config(
        None,
        name="demo",
        run=run,
        **{
            "data.manifest": str(run / "cohort" / "manifest.csv"),
            "preprocess.spacing": [3.0, 3.0, 3.0],
            "preprocess.shape": [48, 48, 48] if quick else [96, 96, 96],
            "preprocess.views.mode": "slab",
            "preprocess.views.thickness": 3,
            "preprocess.workers": 2,
        },
    )


def run_demo(run: Path = Path("runs/demo"), quick: bool = False) -> dict[str, float]:
    """Run the demo; return the wall time of each step in seconds."""
    from pipeline.preprocess.stage import run_preprocess

    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not (run / "cohort" / "manifest.csv").is_file():
        n, size = (24, 64) if quick else (160, None)
        write_cohort(run / "cohort", n, 0.2, size=size, depth=40 if quick else None, seed=0, progress=True)
    timings["synth"] = time.perf_counter() - start
    config = demo_config(run, quick)
    start = time.perf_counter()
    run_preprocess(config)
    timings["preprocess"] = time.perf_counter() - start
    return timings
