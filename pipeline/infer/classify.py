"""Batch classification of new scans with a trained checkpoint: ``medpipe predict classify``.

``run_predict_classify`` reads the inputs (a manifest CSV, a folder of scans, or one file), runs the
checkpoint's own saved preprocessing (``preprocess_volume`` with the sidecar's parameters) and the
model on each case, and writes ``out/predictions.csv`` with one row per input: ``case_id, image,
status, probability, prediction, threshold, reason``. ``probability`` is the positive-class
probability for two classes (else that of the predicted class); ``prediction`` is a class name,
taken at the validation-chosen threshold when ``metrics.json`` sits beside the checkpoint (else
0.5). A case that fails gets an ``error`` row whose reason names its file. Rows are recorded as
cases finish (``out/ledger.csv`` too), so a rerun skips the cases already ``ok``.

Example:
    >>> run_predict_classify(Path("runs/x/classify"), Path("new_scans/"), Path("out/"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.batch import ResultTable, Row, case_signature, run_into_table
from pipeline.config import IOConfig, PreprocessConfig
from pipeline.folder_lock import folder_lock
from pipeline.io import float_text, remove_stale_temps
from pipeline.manifest import Case, input_cases
from pipeline.models import load_classifier
from pipeline.preprocess.stage import mask_requirement, preprocess_volume, read_case
from pipeline.train.classify import model_input

__all__ = ["PREDICTION_COLUMNS", "classify_case", "run_predict_classify"]

PREDICTION_COLUMNS = ("case_id", "image", "status", "probability", "prediction", "threshold", "reason")


@functools.lru_cache(maxsize=2)
def _classifier(model_dir: Path) -> tuple[nn.Module, dict[str, Any], float]:
    """(model, sidecar meta, decision threshold), loaded once per process."""
    model, meta = load_classifier(model_dir / "checkpoint.pt")
    metrics = model_dir / "metrics.json"
    threshold = 0.5
    if metrics.is_file():
        threshold = json.loads(metrics.read_text(encoding="utf-8"))["test"]["at_val_threshold"]["threshold"]
    return model, meta, float(threshold)


@torch.no_grad()
def classify_case(payload: tuple[Path, Case, IOConfig]) -> Row:
    """Preprocess and classify one case, read with ``io``'s options; ``extra`` holds probability,
    prediction and threshold."""
    model_dir, case, io = payload
    if case.problem:
        raise ValueError(case.problem)
    start = time.perf_counter()
    model, meta, threshold = _classifier(model_dir)
    volume, mask = read_case(case, io)
    arrays, _ = preprocess_volume(volume, mask, PreprocessConfig.model_validate(meta["preprocess"]))
    x = torch.from_numpy(model_input(arrays, meta["input"])[None])
    proba = torch.softmax(model(x), 1)[0].numpy()
    classes = meta["classes"]
    if len(proba) == 2:
        index, probability = int(proba[1] >= threshold), float(proba[1])
    else:
        index = int(np.argmax(proba))
        probability = float(proba[index])
    name = classes[index] if index < len(classes) else str(index)
    extra = {"probability": float_text(probability), "prediction": name, "threshold": float_text(threshold)}
    return Row(case.case_id, "ok", "", time.perf_counter() - start, extra=extra)


def _prediction_row(row: Row, image: str) -> dict[str, str]:
    reason = row.reason if not row.reason or image in row.reason else f"{image}: {row.reason}"
    return {"image": image, "status": row.status, **row.extra, "reason": reason}


def run_predict_classify(
    model_dir: Path,
    inputs: Path,
    out: Path,
    workers: int = 0,
    scheduler: str | None = None,
    io: Mapping[str, object] | None = None,
) -> Path:
    """Classify every input case into ``out/predictions.csv``; return that path.

    ``workers`` local processes, or the Dask cluster at ``scheduler`` (see ``pipeline.batch``).
    ``io`` overrides the checkpoint's ``io`` read options (e.g. ``volume_index`` for 4D scans).
    """
    model_dir, out = Path(model_dir).resolve(), Path(out)
    model_lock = (
        folder_lock(model_dir, shared=True) if out.resolve() != model_dir else contextlib.nullcontext()
    )
    with model_lock, folder_lock(out):  # --out as the model folder: its exclusive lock covers both
        _, meta, _ = _classifier(model_dir)  # fail early on a missing or broken checkpoint
        if not (model_dir / "metrics.json").is_file():
            print(
                f"predict classify: no {model_dir / 'metrics.json'} (the classifier was not evaluated), so "
                "predictions use the default threshold 0.5; `medpipe evaluate classify` chooses one on "
                "validation",
                file=sys.stderr,
            )
        read = IOConfig.model_validate({**meta["io"], **(io or {})})
        remove_stale_temps(out)
        cases = input_cases(Path(inputs), out)
        why = mask_requirement(PreprocessConfig.model_validate(meta["preprocess"]))
        if why and not any(c.mask for c in cases):
            raise ValueError(
                f"{model_dir}: the model's preprocessing needs each case's mask ({why}), and {inputs} gives "
                "none; give --input a manifest CSV with a mask column"
            )
        images = {c.case_id: str(c.image) for c in cases}
        table = ResultTable(out / "predictions.csv", PREDICTION_COLUMNS, [c.case_id for c in cases])
        # a rerun redoes a case whose scan, mask, checkpoint or threshold changed since it was done
        base = case_signature(
            "classify" + read.model_dump_json(), (model_dir / "checkpoint.pt", model_dir / "metrics.json")
        )
        run_into_table(
            classify_case,
            {c.case_id: (model_dir, c, read) for c in cases},
            table,
            lambda row: _prediction_row(row, images[row.case_id]),
            out / "ledger.csv",
            desc="classify",
            workers=workers,
            scheduler=scheduler,
            signatures={c.case_id: case_signature(base, (c.image, c.mask)) for c in cases},
        )
        return table.path
