"""Segmentation metrics on the test split: Dice, HD95 (mm) and relative volume error.

``case_metrics`` compares a predicted and a true mask on the same grid with MONAI's ``compute_dice``
and ``compute_hausdorff_distance`` (95th percentile, in mm from the file's voxel spacing; a
singleton axis, as in a one-slice image, is dropped so a 2D case is measured in 2D). The volume
error is (predicted − true) / true lung volume. ``run_evaluate_segment`` segments every test case
with the trained net exactly as ``predict segment`` does (post-processing included) and writes
``RUN/segment/per_case.csv`` and ``RUN/segment/metrics.json`` (mean, sd, median, min, max and a
bootstrap 95% CI per metric, plus the worst cases by Dice).

Example:
    >>> import numpy as np
    >>> truth = np.zeros((20, 20, 1), bool); truth[5:15, 5:15] = True
    >>> m = case_metrics(truth, truth, (1.0, 1.0, 1.0))
    >>> m["dice"], m["hd95_mm"], m["rel_volume_error"]
    (1.0, 0.0, 0.0)
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from pipeline.config import Config
from pipeline.evaluate.bootstrap import bootstrap_ci
from pipeline.folder_lock import folder_lock
from pipeline.infer.segment import load_segmenter, segment_volume
from pipeline.io import atomic_path, read_volume, write_json
from pipeline.train.segment import segment_cases

__all__ = ["METRICS", "OUTPUTS", "case_metrics", "run_evaluate_segment", "summarise"]

METRICS = ("dice", "hd95_mm", "rel_volume_error")
OUTPUTS = ("metrics.json", "per_case.csv")  # in RUN/segment; training deletes them


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """Dice, HD95 in mm and relative volume error of two binary masks on one grid."""
    keep = [axis for axis, n in enumerate(truth.shape) if n > 1]
    p = torch.from_numpy(np.asarray(pred, dtype=bool).squeeze()).float()[None, None]
    t = torch.from_numpy(np.asarray(truth, dtype=bool).squeeze()).float()[None, None]
    dice = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
    hd95 = float("nan")
    if p.any() and t.any():
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated get_mask_edges(always_return_as_numpy=...) here
            warnings.filterwarnings("ignore", "monai.metrics.utils get_mask_edges", FutureWarning)
            hd95 = float(
                compute_hausdorff_distance(
                    p, t, include_background=True, percentile=95, spacing=[float(spacing[a]) for a in keep]
                )[0, 0]
            )
    true_n, pred_n = float(t.sum()), float(p.sum())
    rve = (pred_n - true_n) / true_n if true_n else float("nan")
    return {"dice": dice, "hd95_mm": hd95, "rel_volume_error": rve}


def summarise(values: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean, sd, median, min, max and a percentile-bootstrap 95% CI of the mean (NaNs ignored)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    mean, low, high = bootstrap_ci(np.mean, values, seed=seed)
    return {
        "n": int(values.size),
        "mean": mean,
        "sd": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "median": float(np.median(values)),
        "min": float(values.min()),
        "max": float(values.max()),
        "ci_low": low,
        "ci_high": high,
    }


def run_evaluate_segment(config: Config, flip_tta: bool | None = None) -> Path:
    """Segment the test split with ``RUN/segment``'s net; write per_case.csv and metrics.json there.

    ``flip_tta`` overrides the checkpoint's test-time flip setting (``load_segmenter``).
    """
    out = config.run_dir / "segment"
    with folder_lock(out, create=False):
        segmenter = load_segmenter(out.resolve(), flip_tta)
        cases = [c for c in segment_cases(config) if c.split == "test"]
        if not cases:
            raise ValueError("no test cases with masks to evaluate")
        rows = []
        for case in cases:
            volume = read_volume(case.image, allow_2d=True, series_uid=case.series_uid)
            truth = read_volume(case.mask, allow_2d=True).array > 0
            pred = segment_volume(segmenter, volume) > 0
            rows.append({"case_id": case.case_id, **case_metrics(pred, truth, volume.spacing)})
        metrics_file, per_case_file = OUTPUTS
        with atomic_path(out / per_case_file) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["case_id", *METRICS])
            writer.writeheader()
            writer.writerows(rows)
        worst = sorted(rows, key=lambda r: r["dice"])[:3]
        metrics = {
            "split": "test",
            "cases": len(rows),
            "spacing_note": "HD95 uses each file's voxel spacing (1.0 mm when the source did not record it)",
            **{name: summarise(np.array([r[name] for r in rows])) for name in METRICS},
            "worst_dice": [{"case_id": r["case_id"], "dice": r["dice"]} for r in worst],
        }
        write_json(out / metrics_file, metrics)
        return out
