"""Section 4, predictions: one row per new case, with links to the mask files.

A predict folder is ``RUN/predict`` (or a folder directly below it) holding ``predictions.csv``
(``medpipe predict classify``) and/or ``volumes.csv`` + ``masks/`` (``medpipe predict segment``).
Mask links are relative to ``RUN/report/index.html``, so they work in a zipped run folder.
Probabilities are shown with as many decimals as it takes to tell each one from the decision
threshold, so a score that is displayed as equal to the threshold is never called negative.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from pipeline.report.blocks import Cell, Note, Section, Table, cell, decimals_apart, guard
from pipeline.report.classifier import chosen_on
from pipeline.report.inputs import RunFolder

__all__ = ["OUTPUTS", "predict_folders", "predictions_section"]

OUTPUTS = ("predictions.csv", "volumes.csv")


def predict_folders(run: RunFolder) -> list[Path]:
    """``RUN/predict`` and its sub-folders that hold a predictions.csv or volumes.csv."""
    top = run.root / "predict"
    if not top.is_dir():
        return []
    candidates = [top, *sorted(p for p in top.iterdir() if p.is_dir())]
    return [p for p in candidates if any((p / name).is_file() for name in OUTPUTS)]


def _rows(folder: Path, name: str) -> dict[str, dict[str, str]]:
    """A predict CSV by case id (empty if the folder lacks it)."""
    if not (folder / name).is_file():
        return {}
    return {r["case_id"]: r for r in RunFolder(folder).csv(name)}


def _threshold_note(run: RunFolder, threshold: float, digits: int) -> str:
    """Where the predictions' threshold came from: the run's evaluation, the default, or neither."""
    shown = f"prediction at threshold {threshold:.{digits}f}"
    if not run.has("classify/metrics.json"):
        if threshold == 0.5:
            return f"{shown}, the default: the classifier had not been evaluated (medpipe evaluate classify)"
        return shown
    metrics = run.json("classify/metrics.json")
    chosen = float(metrics["test"]["at_val_threshold"]["threshold"])
    if chosen != threshold:
        return (
            f"{shown}, not the {chosen:.{digits}f} that the latest evaluation chose on "
            f"{chosen_on(metrics)}: rerun medpipe predict classify"
        )
    return f"{shown} (chosen on {chosen_on(metrics)})"


def _table(run: RunFolder, folder: Path, report_dir: Path, rel: str) -> Table:
    classes, volumes = _rows(folder, "predictions.csv"), _rows(folder, "volumes.csv")
    threshold = next((float(r["threshold"]) for r in classes.values() if r.get("threshold")), None)
    scores = [float(r["probability"]) for r in classes.values() if r.get("probability")]
    digits = decimals_apart(scores, threshold) if threshold is not None else 3
    header = ["case"]
    if classes:
        header += ["probability", "prediction"]
    if volumes:
        header += ["right lung (mL)", "left lung (mL)", "total (mL)", "mask"]
    header += ["status", "reason"]
    body, failed = [], set()
    for i, case_id in enumerate(dict.fromkeys([*classes, *volumes])):
        c, v = classes.get(case_id, {}), volumes.get(case_id, {})
        row = [Cell(case_id)]
        if classes:
            row += [cell(c.get("probability"), digits), Cell(c.get("prediction", ""))]
        if volumes:
            mask = folder / "masks" / f"{case_id}.nii.gz"
            href = quote(Path(os.path.relpath(mask, report_dir)).as_posix())
            link = Cell("mask", href) if mask.is_file() else Cell("–")
            row += [cell(v.get(k), 1) for k in ("right_ml", "left_ml", "total_ml")] + [link]
        statuses = {s for s in (c.get("status"), v.get("status")) if s}
        status = "error" if "error" in statuses else "/".join(sorted(statuses))
        reason = "; ".join(r for r in (c.get("reason"), v.get("reason")) if r)
        row += [Cell(status, cls="bad" if status == "error" else ""), Cell(reason, cls="reason")]
        if status == "error":
            failed.add(i)
        body.append(row)
    notes = [
        _threshold_note(run, threshold, digits) if threshold is not None else "",
        _retrained_note(run, folder),
    ]
    return Table(
        f"Per-case outputs: {rel}", header, body, muted=failed, note=". ".join(n for n in notes if n)
    )


def _retrained_note(run: RunFolder, folder: Path) -> str:
    """A warning if the run's model of a task was trained again after this folder's outputs of it."""
    stale = [
        task
        for task, output in (("classify", "predictions.csv"), ("segment", "volumes.csv"))
        if (folder / output).is_file()
        and run.has(f"{task}/checkpoint.pt")
        and run.path(f"{task}/checkpoint.pt").stat().st_mtime > (folder / output).stat().st_mtime
    ]
    return " ".join(
        f"Warning: {run.root.name}/{task}/checkpoint.pt is newer than these outputs, which may come from "
        f"a model it replaced: rerun medpipe predict {task}."
        for task in stale
    )


def predictions_section(run: RunFolder, report_dir: Path) -> Section:
    """Section 4: a table per predict folder, or a note that there is none."""
    blocks: list = []
    folders = predict_folders(run)
    if not folders:
        blocks.append(
            Note(f"Predictions omitted: no {run.root.name}/predict folder with {' or '.join(OUTPUTS)}")
        )
    for folder in folders:
        rel = folder.relative_to(run.root).as_posix()
        guard(blocks, f"Predictions in {rel}", lambda f=folder, r=rel: [_table(run, f, report_dir, r)])
    lead = "New scans run through the trained models (medpipe predict). Masks are in each input's own grid."
    return Section("predictions", "Predictions", lead=lead, blocks=blocks)
