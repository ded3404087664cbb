"""``medpipe run CONFIG.yaml``: the stages a config names, in order, each the plain stage function.

Where each stage writes (all under the run folder):

- preprocess: ``RUN/preprocess/``; classify: ``RUN/classify/`` (train, then evaluate; a training
  interrupted under the same config is continued, any other starts afresh);
- segment: ``RUN/segment/`` (train, then evaluate); predict: ``RUN/predict/<task>/``;
- report: ``RUN/report/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config
from pipeline.io import write_json
from pipeline.train.resume import interrupted

__all__ = ["STAGES", "predict_dir", "record_timings", "run_stages"]


def predict_dir(config: Config, task: str) -> Path:
    """Where ``medpipe run`` writes a task's predictions."""
    return config.run_dir / "predict" / task


def _preprocess(config: Config) -> None:
    from pipeline.preprocess.stage import run_preprocess

    run_preprocess(config)


def _classify(config: Config) -> None:
    from pipeline.evaluate.classification import run_evaluate_classify
    from pipeline.train.classify import TRAINING_SECTIONS, cache_inputs, run_train_classify

    out = config.run_dir / "classify"
    run_train_classify(config, resume=interrupted(out, config, TRAINING_SECTIONS, cache_inputs(config)))
    run_evaluate_classify(config)


def _segment(config: Config) -> None:
    from pipeline.evaluate.segmentation import run_evaluate_segment
    from pipeline.train.segment import TRAINING_SECTIONS, run_train_segment

    run_train_segment(config, resume=interrupted(config.run_dir / "segment", config, TRAINING_SECTIONS, {}))
    run_evaluate_segment(config)


def _predict(config: Config) -> None:
    from pipeline.infer.classify import run_predict_classify
    from pipeline.infer.segment import run_predict_segment

    pcfg = config.predict
    if pcfg.classify is None and pcfg.segment is None:
        raise ValueError("stage 'predict' needs predict.classify or predict.segment (scans to predict on)")
    if pcfg.classify is not None:
        run_predict_classify(
            config.run_dir / "classify", pcfg.classify, predict_dir(config, "classify"), pcfg.workers
        )
    if pcfg.segment is not None:
        run_predict_segment(
            config.run_dir / "segment", pcfg.segment, predict_dir(config, "segment"), pcfg.workers
        )


def _report(config: Config) -> None:
    from pipeline.report.stage import run_report

    run_report(config)


STAGES: dict[str, Callable[[Config], None]] = {
    "preprocess": _preprocess,
    "classify": _classify,
    "segment": _segment,
    "predict": _predict,
    "report": _report,
}


def record_timings(run: Path, timings: dict[str, float]) -> None:
    """Merge step wall times (seconds) into ``RUN/timings.json``, which the report shows."""
    path = run / "timings.json"
    merged = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    merged.update({step: round(seconds, 2) for step, seconds in timings.items()})
    write_json(path, merged)


def run_stages(config: Config, stages: list[str] | None = None) -> dict[str, float]:
    """Run the named stages (default: the config's) in order; return and record each one's wall time.

    A stage's time is recorded before the next starts, so the report stage sees the earlier ones.
    """
    timings = {}
    for stage in stages or config.stages:
        start = time.perf_counter()
        STAGES[stage](config)
        timings[stage] = time.perf_counter() - start
        record_timings(config.run_dir, {stage: timings[stage]})
    return timings
