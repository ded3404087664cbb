"""Classification metrics with bootstrap 95% CIs, and the ``evaluate classify`` stage.

The decision threshold is chosen on the validation split (with a fold ensemble, by default on the
validation split together with every training case's out-of-fold score) and applied unchanged to test:
``youden`` takes the ROC point maximising sensitivity + specificity - 1 (``roc_curve`` threshold);
``balanced_accuracy`` takes the midpoint between adjacent validation scores that maximises balanced
accuracy (for two classes the same criterion, with the cut placed between cases rather than on one).
Results at 0.5 are reported beside it. Metrics come from scikit-learn; each has a percentile
bootstrap CI over test cases (``pipeline.evaluate.bootstrap``) with the threshold held fixed.

Example:
    >>> y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    >>> binary_metrics(y, p, 0.5)["sensitivity"]
    0.5
"""

from __future__ import annotations

import csv
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pipeline.config import Config
from pipeline.evaluate.bootstrap import bootstrap_ci
from pipeline.folder_lock import folder_lock
from pipeline.io import atomic_path, float_text, write_json
from pipeline.models import load_classifier, model_spec

__all__ = [
    "OUTPUTS",
    "THRESHOLD_METRICS",
    "binary_metrics",
    "choose_threshold",
    "metrics_with_ci",
    "run_evaluate_classify",
    "threshold_cases",
]

OUTPUTS = ("metrics.json", "test_predictions.csv")  # in RUN/classify; training deletes them

# A metric whose denominator is empty (sensitivity of a split without positives, precision with no
# positive prediction, balanced accuracy with one class) is NaN, written as null: undefined, not 0,
# and left out of the bootstrap.
THRESHOLD_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy_score,
    "balanced_accuracy": lambda y, pred: (
        balanced_accuracy_score(y, pred) if len(np.unique(y)) > 1 else np.nan
    ),
    "sensitivity": lambda y, pred: recall_score(y, pred, pos_label=1, zero_division=np.nan),
    "specificity": lambda y, pred: recall_score(y, pred, pos_label=0, zero_division=np.nan),
    "precision": lambda y, pred: precision_score(y, pred, zero_division=np.nan),
    "f1": lambda y, pred: f1_score(y, pred, zero_division=np.nan),
}


def choose_threshold(labels: np.ndarray, scores: np.ndarray, method: str = "youden") -> float:
    """The positive-class threshold (predict 1 if score >= threshold) chosen on these cases."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if len(np.unique(labels)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation split")
    if method == "youden":
        fpr, tpr, thresholds = roc_curve(labels, scores)
        return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))
    if method == "balanced_accuracy":
        values = np.unique(scores)
        candidates = np.concatenate(
            [[values[0]], (values[:-1] + values[1:]) / 2, [np.nextafter(values[-1], 2)]]
        )
        bacc = [balanced_accuracy_score(labels, scores >= t) for t in candidates]
        return float(candidates[int(np.argmax(bacc))])
    raise ValueError(f"unknown threshold method {method!r}: youden or balanced_accuracy")


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Point estimates at a threshold: AUC, the THRESHOLD_METRICS and the confusion matrix."""
    labels, pred = np.asarray(labels), (np.asarray(scores) >= threshold).astype(int)
    result: dict[str, Any] = {"auc": float(roc_auc_score(labels, scores))}
    result.update({name: float(fn(labels, pred)) for name, fn in THRESHOLD_METRICS.items()})
    result["confusion_matrix"] = confusion_matrix(labels, pred, labels=[0, 1]).tolist()
    return result


def metrics_with_ci(
    labels: np.ndarray, scores: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Every metric as {value, ci_low, ci_high} (bootstrap 95%), plus the confusion matrix
    ([[TN, FP], [FN, TP]]) and the threshold."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)

    def at_threshold(fn: Callable) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda y, s: fn(y, (s >= threshold).astype(int))

    fns = {"auc": roc_auc_score, **{name: at_threshold(fn) for name, fn in THRESHOLD_METRICS.items()}}
    result: dict[str, Any] = {"threshold": float(threshold)}
    for name, fn in fns.items():
        with warnings.catch_warnings():  # resamples with one class: NaN AUC, skipped by bootstrap_ci
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
            warnings.filterwarnings("ignore", "A single label was found")
            value, low, high = bootstrap_ci(fn, labels, scores, n_boot=n_boot, seed=seed)
        result[name] = {"value": value, "ci_low": low, "ci_high": high}
    result["confusion_matrix"] = confusion_matrix(
        labels, (scores >= threshold).astype(int), labels=[0, 1]
    ).tolist()
    return result


def threshold_cases(
    model_dir: Path, meta: dict[str, Any], val_labels: np.ndarray, val_scores: np.ndarray, on: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) the threshold is chosen on: val, plus the out-of-fold scores of a fold
    ensemble's training cases when ``on`` is ``val+oof``."""
    if on != "val+oof" or int(meta.get("folds", 1)) == 1:
        return val_labels, val_scores
    with (model_dir / "oof_predictions.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["probability"]) for r in rows])
    return np.concatenate([val_labels, labels]), np.concatenate([val_scores, scores])


def run_evaluate_classify(config: Config) -> Path:
    """Evaluate ``RUN/classify/checkpoint.pt`` on val (threshold) and test; return the metrics path."""
    from pipeline.train.classify import load_split, predict_proba, split_rows

    cfg = config.classify
    out, prep = config.run_dir / "classify", config.run_dir / "preprocess"
    with folder_lock(out, create=False), folder_lock(prep, shared=True):
        model, meta = load_classifier(out / "checkpoint.pt", cfg.device)
        if len(meta["classes"]) > 2:
            raise ValueError("evaluate classify supports two classes (thresholded metrics)")
        key = model_spec(meta["model"]).input
        val, test = load_split(prep, "val", key), load_split(prep, "test", key)
        _, excluded = split_rows(prep, "test")
        if excluded:
            print(
                f"warning: {prep / 'ledger.csv'}: {len(excluded)} test case(s) failed preprocessing and are "
                f"left out of the metrics: {', '.join(excluded)}",
                file=sys.stderr,
            )
        val_scores = predict_proba(model, val.inputs, device=cfg.device)[:, 1]
        test_scores = predict_proba(model, test.inputs, device=cfg.device)[:, 1]
        labels, scores = threshold_cases(out, meta, val.labels, val_scores, cfg.threshold_on)
        threshold = choose_threshold(labels, scores, cfg.threshold)
        metrics = {
            "classes": meta["classes"],
            "positive_class": meta["classes"][1],  # what sensitivity, precision and AUC are of
            "confusion_matrix_layout": "rows: true class, columns: predicted class, each in classes order "
            "([[TN, FP], [FN, TP]])",
            "checkpoint_epoch": meta.get("epoch"),
            "threshold_method": cfg.threshold,
            "threshold_cases": {"val": len(val.labels), "out_of_fold": len(labels) - len(val.labels)},
            "n_boot": cfg.n_boot,
            "val": {"n": len(val.labels), **binary_metrics(val.labels, val_scores, threshold)},
            "test": {
                "n": len(test.labels),
                "positives": int(test.labels.sum()),
                "excluded": excluded,  # failed preprocessing (the ledger says why)
                "at_val_threshold": metrics_with_ci(
                    test.labels, test_scores, threshold, cfg.n_boot, cfg.seed
                ),
                "at_0.5": metrics_with_ci(test.labels, test_scores, 0.5, cfg.n_boot, cfg.seed),
            },
        }
        metrics_file, predictions_file = OUTPUTS
        write_json(out / metrics_file, metrics)
        with atomic_path(out / predictions_file) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["case_id", "label", "probability", "prediction"])
            for cid, label, score in zip(test.case_ids, test.labels, test_scores, strict=True):
                writer.writerow([cid, int(label), float_text(score), int(score >= threshold)])
        return out / metrics_file
