"""Training curves of a stage from its ``history.csv`` (shared by the classifier and segmentation)."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.report import plots
from pipeline.report.blocks import Figures, Image
from pipeline.report.inputs import RunFolder

__all__ = ["training_curves"]


def training_curves(
    run: RunFolder, figures: Figures, stage: str, validation: Mapping[str, str]
) -> list[Image]:
    """Loss, the ``validation`` columns present ({column: legend label}) and LR per epoch."""
    history = run.columns(f"{stage}/history.csv")
    series = {label: [float(v) for v in history[col]] for col, label in validation.items() if col in history}
    best = run.json(f"{stage}/checkpoint.json").get("epoch") if run.has(f"{stage}/checkpoint.json") else None
    fig = plots.training_curves(
        [int(e) for e in history["epoch"]],
        [float(v) for v in history["train_loss"]],
        series,
        [float(v) for v in history["lr"]] if "lr" in history else None,
        best_epoch=best,
    )
    best_text = (
        f"; the dashed line marks the best epoch ({best}), whose weights were kept"
        if best is not None
        else ""
    )
    shown = ", ".join(series) or "none recorded"
    if (folds := run.folds(stage)) > 1:  # its history is the members' mean (pipeline.train.classify)
        shown += f"; each the mean of the {folds} members on their own held-out folds, not the val split"
    caption = f"Training loss, validation metrics ({shown}) and learning rate per epoch{best_text}."
    return [figures.add(fig, f"{stage}_curves", caption, f"{stage} training curves")]
