"""Section 3, segmentation: curves, Dice/HD95 table, per-case plot, contour overlays, lung volumes.

Reads ``RUN/segment/{history.csv, checkpoint.json, metrics.json, per_case.csv, config.yaml}``. The
evaluation stage keeps no predicted masks, so the overlays re-run the trained net
(``pipeline.infer.segment``) on the best, median and worst test cases by Dice; the reference lung
volumes come from the test masks, the predicted ones from the relative volume error.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import yaml

from pipeline.config import Config
from pipeline.io import read_volume
from pipeline.manifest import Case
from pipeline.preprocess.views import center_index, extract_views
from pipeline.report import plots
from pipeline.report.blocks import Cell, Figures, Note, Section, Table, cell, guard
from pipeline.report.curves import training_curves
from pipeline.report.inputs import RunFolder
from pipeline.segment.postprocess import lung_volumes

__all__ = ["DEFINITIONS", "METRIC_LABELS", "display_views", "ranked_cases", "segmentation_section"]

METRIC_LABELS = {"dice": "Dice", "hd95_mm": "HD95 (mm)", "rel_volume_error": "Relative volume error"}
DEFINITIONS = [
    ("Dice", "2|P ∩ T| / (|P| + |T|): overlap of predicted (P) and reference (T) lungs; 1 is perfect."),
    (
        "HD95",
        "95th percentile of the distances between the two lung surfaces, in mm (in-plane for 2D "
        "images); robust to a few stray voxels.",
    ),
    (
        "Relative volume error",
        "(predicted − reference) / reference lung volume; negative means under-segmentation.",
    ),
    ("95% CI", "percentile bootstrap of the mean over test cases."),
]


def display_views(
    array: np.ndarray, affine: np.ndarray, center: Sequence[int] | None = None, fill: float | None = None
) -> tuple[np.ndarray, list[float]]:
    """(V, H, W) radiological display views of a native-grid volume, and each view's pixel aspect.

    The array is brought to RAS axis order by flips and transposes only (no resampling), so the
    views follow ``pipeline.preprocess.views``; ``center`` is a voxel of the RAS-ordered array.
    """
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(np.asarray(array), ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    views = extract_views(ras, center, "slice", fill=fill)[:, 0]
    aspect = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    return views, aspect[: len(views)]


def _ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return nib.orientations.apply_orientation(np.asarray(array), nib.orientations.io_orientation(affine))


def _overlay_center(mask: np.ndarray) -> tuple[int, int, int]:
    """The lungs' centroid, moved sideways onto the sagittal plane with the most lung (the centroid
    itself lies in the mediastinum, between the lungs)."""
    center = list(center_index(mask.shape, mask=mask))
    center[0] = int(np.argmax(mask.sum(axis=(1, 2))))
    return tuple(center)  # type: ignore[return-value]


def ranked_cases(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """The best, median and worst rows by Dice (fewer when there are fewer cases)."""
    ordered = sorted(rows, key=lambda r: float(r["dice"]), reverse=True)
    picks = {"best": ordered[0], "median": ordered[len(ordered) // 2], "worst": ordered[-1]}
    seen, unique = set(), {}
    for name, row in picks.items():
        if row["case_id"] not in seen:
            seen.add(row["case_id"])
            unique[name] = row
    return unique


def _test_cases(run: RunFolder) -> dict[str, Case]:
    """The segmentation cases by id, from the manifest named in ``segment/config.yaml``."""
    from pipeline.train.segment import segment_cases

    config = Config.model_validate(yaml.safe_load(run.text("segment/config.yaml")))
    return {c.case_id: c for c in segment_cases(config)}


def _metrics_table(run: RunFolder) -> list:
    metrics = run.json("segment/metrics.json")
    stats = ("n", "mean", "sd", "median", "min", "max")
    body = []
    for key, label in METRIC_LABELS.items():
        if key in metrics:
            m = metrics[key]
            ci = f"[{cell(m.get('ci_low')).text}, {cell(m.get('ci_high')).text}]"
            body.append([Cell(label), *(cell(m.get(s)) for s in stats), Cell(ci, cls="num")])
    note = f"Test split, {metrics.get('cases', '?')} cases. {metrics.get('spacing_note', '')}".strip()
    header = ["metric", "n", "mean", "sd", "median", "min", "max", "95% CI of the mean"]
    return [Table("Segmentation metrics on the test split", header, body, emphasis={0}, note=note)]


def _distribution(run: RunFolder, figures: Figures) -> list:
    per_case = run.columns("segment/per_case.csv")
    values = {label: [float(v) for v in per_case[k]] for k, label in METRIC_LABELS.items() if k in per_case}
    caption = "Per-case distribution on the test split: each dot is one case; boxes span the quartiles."
    return [
        figures.add(plots.distribution(values), "segment_per_case", caption, "per-case metric distribution")
    ]


def _overlays(run: RunFolder, figures: Figures) -> list:
    from pipeline.infer.segment import load_segmenter, segment_volume

    picks = ranked_cases(run.csv("segment/per_case.csv"))
    cases = _test_cases(run)
    segmenter = load_segmenter(run.path("segment").resolve())
    rows = []
    for name, row in picks.items():
        case = cases[row["case_id"]]
        volume = read_volume(case.image, allow_2d=True, series_uid=case.series_uid)
        truth = read_volume(case.mask, allow_2d=True).array > 0
        pred = segment_volume(segmenter, volume) > 0
        center = _overlay_center(_ras(truth, volume.affine))
        image, aspect = display_views(volume.array, volume.affine, center)
        truth_views = display_views(truth.astype(np.uint8), volume.affine, center, fill=0)[0]
        pred_views = display_views(pred.astype(np.uint8), volume.affine, center, fill=0)[0]
        title = f"{name}\n{case.case_id}\nDice {float(row['dice']):.3f}"
        rows.append(plots.ViewRow(title, list(image), list(truth_views), list(pred_views), aspect))
    caption = (
        "Reference (green) and predicted (orange) lung contours for the best, median and worst test cases "
        "by Dice, on each scan's own grid in radiological display orientation: axial and coronal planes "
        "through the reference lungs' centroid, the sagittal plane through the most lung."
    )
    return [figures.add(plots.view_grid(rows), "segment_overlays", caption, "lung contour overlays")]


def _volumes(run: RunFolder) -> list:
    rows = run.csv("segment/per_case.csv")
    cases = _test_cases(run)
    body = []
    for row in rows:
        mask = read_volume(cases[row["case_id"]].mask, allow_2d=True)
        labels = np.asarray(mask.array)
        sided = set(np.unique(labels).tolist()) <= {0, 1, 2} and 2 in labels
        ref = lung_volumes(labels, mask.affine, sides=sided)
        error = float(row["rel_volume_error"])
        body.append(
            [
                Cell(row["case_id"]),
                cell(float(row["dice"])),
                *(cell(ref[k], 1) for k in ("right_ml", "left_ml", "total_ml")),
                cell(ref["total_ml"] * (1 + error), 1),
                cell(100 * error, 1),
            ]
        )
    header = [
        "case",
        "Dice",
        "reference right (mL)",
        "reference left (mL)",
        "reference total (mL)",
        "predicted total (mL)",
        "volume error (%)",
    ]
    note = (
        "Predicted total = reference total × (1 + relative volume error); both measured on the scan's "
        "grid, with its voxel spacing (1.0 mm where the source did not record it: a single slice's "
        "volume is then that of a 1 mm slab)."
    )
    return [Table("Lung volumes, test split", header, body, note=note)]


def segmentation_section(run: RunFolder, figures: Figures) -> Section:
    """Section 3; parts whose inputs are missing become one-line notes."""
    section = Section("segmentation", "Segmentation")
    if not run.has("segment"):
        section.blocks.append(Note(f"Segmentation omitted: no {run.root.name}/segment folder"))
        return section
    section.definitions = DEFINITIONS
    blocks = section.blocks
    section.lead = (
        "Lung segmentation: a 2D U-Net run slice by slice, post-processed into right and left lungs."
    )
    guard(
        blocks,
        "Training curves",
        lambda: training_curves(
            run, figures, "segment", {"val_dice": "val Dice", "val_dice_min": "val Dice (worst slice)"}
        ),
    )
    guard(blocks, "Dice/HD95 table", lambda: _metrics_table(run))
    guard(blocks, "Per-case distribution", lambda: _distribution(run, figures))
    guard(blocks, "Contour overlays", lambda: _overlays(run, figures))
    guard(blocks, "Lung volume table", lambda: _volumes(run))
    return section
