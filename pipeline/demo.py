"""``medpipe demo``: every stage on a generated phantom cohort, into one run folder.

Steps: synthesise a cohort (240 cases, 20% with a lung lesion) into ``RUN/cohort`` and a fresh,
unseen one into ``RUN/new_scans``; then preprocess, train + evaluate the classifier and the lung
segmenter, predict on the new scans and write the report, through ``pipeline.workflow``. A rerun
resumes (finished cases are skipped, cohorts are not rewritten). ``quick`` is the small variant the
tests use.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.synth import LABEL_NAMES, write_cohort
from pipeline.workflow import record_timings, run_stages

__all__ = ["demo_config", "run_demo"]

STAGES = ["preprocess", "classify", "segment", "predict", "report"]


def demo_config(run: Path, quick: bool) -> Config:
    """The demo's config: small CT cubes, views as projections within the lung mask (a nodule
    anywhere in a lung shows up in a lung-only MIP), a compact CNN-LSTM, a U-Net on 96² slices."""
    return load_config(
        None,
        name="demo",
        run=run,
        stages=STAGES,
        **{
            "data.manifest": str(run / "cohort" / "manifest.csv"),
            "data.classes": list(LABEL_NAMES),  # normal = 0, lesion = 1: the positive class is last
            "preprocess.spacing": [3.0, 3.0, 3.0],
            "preprocess.shape": [48, 48, 48] if quick else [96, 96, 96],
            "preprocess.views.mode": "projections",
            "preprocess.views.within_mask": True,
            "preprocess.views.mask_margin_mm": 3.0,  # one voxel: no bright partial-volume rim in the MIP
            "preprocess.workers": 2,
            "classify.epochs": 2 if quick else 30,
            "classify.pool": "avgmax",  # a nodule is a small local finding: keep the max response
            "classify.batch_size": 16,
            "segment.epochs": 1 if quick else 6,
            "segment.size": 64 if quick else 96,
            "segment.slices_per_volume": 4 if quick else 6,
            "predict.classify": str(run / "new_scans" / "manifest.csv"),  # its lung masks feed the views
            "predict.segment": str(run / "new_scans" / "images"),
            "predict.workers": 2,
        },
    )


def run_demo(run: Path = Path("runs/demo"), quick: bool = False) -> dict[str, float]:
    """Run the demo; return the wall time of each stage in seconds (all steps: ``RUN/timings.json``)."""
    start = time.perf_counter()
    # 240 cases, not 160: with 22 positive training cases the classifier's AUC on an independent
    # phantom cohort swung 0.72-0.82 over seeds; with 240 it is 0.91-0.94 (bench/demo_classifier.py)
    n, new, size, depth = (24, 4, 64, 40) if quick else (240, 12, None, None)
    for folder, count, seed in ((run / "cohort", n, 0), (run / "new_scans", new, 1000)):
        if not (folder / "manifest.csv").is_file():
            write_cohort(folder, count, 0.2, size=size, depth=depth, seed=seed, progress=True, workers=2)
    record_timings(run, {"synth": time.perf_counter() - start})
    return run_stages(demo_config(run, quick))
