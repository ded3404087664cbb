"""Diagnosis: is AdrenalMNIST3D's test AUC limited by the amount of training data, or by the labels?

Two independent model families are trained on nested, stratified fractions of the training split
(the same subsets for both) and scored on val and test:

- the shipped CNN-LSTM (``BEST`` of ``bench/classify_adrenal.py``) as a single model (no fold
  ensemble, so a run takes a minute or two), best epoch chosen on val;
- a logistic regression on hand-made shape descriptors of the mask (``shape_features``: volume,
  surface, Feret diameter, elongation, flatness, principal moments, thickness from the distance
  map), which shares no code, input or inductive bias with the CNN beyond the mask itself.

If test AUC still climbs from half to all of the training data, more or better data would help;
if both families are flat there and land close together, the remaining error is in what the masks
can say about the label. Each model's balanced accuracy and accuracy at the threshold best for it
on test itself bound what any threshold rule could reach with that ranking. Nothing here is
selected on test: the figures are a learning curve, not a model choice.

Measured (seeds 0-2, 2-core CPU; mean ± sd of test AUC, then the best-threshold balanced accuracy):

| train cases | CNN-LSTM, 28³ | descriptor LR, 28³ | descriptor LR, 64³ |
|---|---|---|---|
| 297 | 0.877 ± 0.011, 0.806 | 0.893 ± 0.006, 0.814 | 0.907 ± 0.003, 0.817 |
| 594 | 0.886 ± 0.011, 0.818 | 0.896 ± 0.008, 0.828 | 0.907 ± 0.008, 0.821 |
| 1188 | 0.900 ± 0.006, 0.827 | 0.898, 0.811 | 0.908, 0.824 |

The descriptors are flat from a quarter of the data on; the CNN-LSTM rises to where they already
are (its 4-fold ensemble: 0.904). No model passes balanced accuracy 0.84 even at its best test
threshold. The CNN-LSTM runs took 35-42 s, 68-74 s and 135-147 s each on an idle machine.

Usage:
    python bench/classify_adrenal_ceiling.py [--fractions 0.25 0.5 1] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classify_adrenal import BEST, DATA, grid_size, make_config, mean_sd, train_and_evaluate

from pipeline.config import Config
from pipeline.preprocess.stage import run_preprocess

MODELS = {"cnn": "CNN-LSTM", "lr": "descriptor LR"}


def shape_features(path: Path) -> np.ndarray:
    """Shape descriptors of one binary mask, taken as one object: 24 numbers (size, surface, Feret
    diameter, elongation, flatness, roundness, principal moments, oriented box, distance-to-surface
    percentiles, the number of connected pieces), in mm, mm² and mm³ where they have units."""
    image = sitk.ReadImage(str(path))
    mask = sitk.BinaryThreshold(image, 128, 255, 1, 0)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.SetComputeFeretDiameter(True)
    stats.SetComputePerimeter(True)
    stats.SetComputeOrientedBoundingBox(True)
    stats.Execute(mask)
    if not stats.HasLabel(1):
        return np.zeros(24)
    array = sitk.GetArrayFromImage(mask).astype(bool)
    spacing = image.GetSpacing()[::-1]
    depth = ndimage.distance_transform_edt(array, sampling=spacing)[array]  # mm to the surface
    volume = stats.GetPhysicalSize(1)
    surface = stats.GetPerimeter(1)
    moments = stats.GetPrincipalMoments(1)
    box = stats.GetOrientedBoundingBoxSize(1)
    return np.array(
        [
            volume,
            np.cbrt(volume),
            surface,
            volume / max(surface, 1e-6),
            stats.GetFeretDiameter(1),
            stats.GetElongation(1),
            stats.GetFlatness(1),
            stats.GetRoundness(1),
            stats.GetEquivalentSphericalRadius(1),
            *moments,
            *box,
            *np.percentile(depth, [50, 75, 90, 95, 99, 100]),
            depth.mean(),
            float(len(np.unique(sitk.GetArrayFromImage(sitk.ConnectedComponent(mask))))) - 1,
            (depth > 2 * spacing[0]).mean(),
        ]
    )


def nested_subsets(rows: list[dict[str, str]], fractions: list[float], seed: int) -> dict[float, set[str]]:
    """Case ids of the train split for each fraction: stratified by label, each subset inside the
    next larger one, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["case_id"])
    order = {label: list(rng.permutation(ids)) for label, ids in by_label.items()}
    return {
        f: {cid for ids in order.values() for cid in ids[: max(2, round(f * len(ids)))]} for f in fractions
    }


def subset_prep(prep: Path, keep: set[str], dest: Path) -> Path:
    """A preprocess folder whose train split holds only ``keep`` (the cache is shared by a link)."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in prep.iterdir():
        target = dest / item.name
        if item.name == "cases.csv" or target.exists():
            continue
        if item.is_dir():
            target.symlink_to(item.resolve(), target_is_directory=True)
        else:
            shutil.copy2(item, target)
    with (prep / "cases.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["split"] != "train" or r["case_id"] in keep]
        fields = reader.fieldnames or []
    with (dest / "cases.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return dest


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The balanced accuracy and the accuracy at the best threshold for each, chosen on these very
    labels: an upper bound for any threshold rule, set by the ranking alone."""
    fpr, tpr, _ = roc_curve(labels, scores)
    positives = labels.sum()
    accuracy = (tpr * positives + (1 - fpr) * (len(labels) - positives)) / len(labels)
    return float(((tpr + 1 - fpr) / 2).max()), float(accuracy.max())


def descriptor_scores(
    features: dict[str, np.ndarray], rows: list[dict[str, str]], keep: set[str]
) -> tuple[float, np.ndarray, np.ndarray]:
    """The shape-descriptor logistic regression trained on ``keep`` (its regularisation fixed, not
    tuned): its val AUC, and the test labels with its test scores."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, class_weight="balanced", max_iter=5000))
    train = [r for r in rows if r["split"] == "train" and r["case_id"] in keep]
    model.fit(np.stack([features[r["case_id"]] for r in train]), [int(r["label"]) for r in train])

    def scored(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = [r for r in rows if r["split"] == split]
        labels = np.array([int(r["label"]) for r in part])
        return labels, model.predict_proba(np.stack([features[r["case_id"]] for r in part]))[:, 1]

    return float(roc_auc_score(*scored("val"))), *scored("test")


def cnn_scores(config: Config, prep: Path) -> tuple[tuple[float, np.ndarray, np.ndarray], float]:
    """Train the single CNN-LSTM of ``config`` on ``prep``: its val AUC, the test labels with its
    test probabilities, and the training seconds."""
    metrics, seconds = train_and_evaluate(config, prep)
    with (config.run_dir / "classify" / "test_predictions.csv").open(newline="") as fh:
        test = list(csv.DictReader(fh))
    labels = np.array([int(r["label"]) for r in test])
    return (metrics["val"]["auc"], labels, np.array([float(r["probability"]) for r in test])), seconds


def record(
    cell: dict[str, list[float]], model: str, val_auc: float, labels: np.ndarray, scores: np.ndarray
) -> str:
    """Add one run's val and test AUC and best-threshold figures to ``cell``; a line saying them."""
    bacc, acc = best_threshold(labels, scores)
    figures = {"val": val_auc, "test": float(roc_auc_score(labels, scores)), "bacc": bacc, "acc": acc}
    for key, value in figures.items():
        cell[f"{model}_{key}"].append(value)
    return (
        f"{MODELS[model]} val/test AUC {figures['val']:.3f} / {figures['test']:.3f}, "
        f"best test bACC/ACC {bacc:.3f} / {acc:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-cnn", action="store_true", help="the shape-descriptor model alone (seconds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = (args.out or Path(tempfile.mkdtemp(prefix="classify_adrenal_ceiling_"))).resolve()
    size = grid_size(args.data)
    single = {**BEST, "classify.folds": 1, "classify.fold_workers": 1}
    prep = None
    if not args.no_cnn:
        prep = run_preprocess(make_config(args.data, out / "prep", size, "slab", **single))

    with (args.data / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    features = {r["case_id"]: shape_features(args.data / r["image"]) for r in rows}
    train_rows = [r for r in rows if r["split"] == "train"]

    results: dict[float, dict[str, list[float]]] = {f: defaultdict(list) for f in args.fractions}
    sizes: dict[float, int] = {}
    for seed in args.seeds:
        for fraction, keep in nested_subsets(train_rows, args.fractions, seed).items():
            cell, sizes[fraction] = results[fraction], len(keep)
            parts = [f"seed {seed} fraction {fraction}: {len(keep)} train cases"]
            if prep is not None:
                run = out / f"f{fraction}_seed{seed}"
                run.mkdir(parents=True, exist_ok=True)
                sub = subset_prep(prep, keep, out / f"prep_f{fraction}_seed{seed}")
                config = make_config(args.data, run, size, "slab", **{**single, "classify.seed": seed})
                scores, seconds = cnn_scores(config, sub)
                parts.append(f"{record(cell, 'cnn', *scores)} ({seconds:.0f} s)")
            parts.append(record(cell, "lr", *descriptor_scores(features, rows, keep)))
            print(", ".join(parts), flush=True)

    print(f"\nLearning curve, AdrenalMNIST3D {size}³, seeds {args.seeds}; outputs in {out}")
    print("(best bACC / ACC: at the threshold best for each on test itself, an upper bound for any rule)")
    for model, name in MODELS.items():
        if not any(cell[f"{model}_test"] for cell in results.values()):
            continue
        print(f"\n{name}\n| train fraction | cases | val AUC | test AUC | best test bACC | best test ACC |")
        print("|---|---|---|---|---|---|")
        for fraction, cell in results.items():
            figures = " | ".join(mean_sd(cell[f"{model}_{k}"]) for k in ("val", "test", "bacc", "acc"))
            print(f"| {fraction:g} | {sizes[fraction]} | {figures} |")


if __name__ == "__main__":
    main()
