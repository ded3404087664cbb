"""Section 2, classifier: curves, test metrics with CIs, confusion, ROC/PR, calibration, montage.

Reads ``RUN/classify/{history.csv, checkpoint.json, metrics.json, test_predictions.csv}``, the
preprocessing cache (for the montage) and, if present, ``RUN/classify/balance_comparison.csv``: one
row per class-balancing strategy, a ``strategy`` column and any metric columns (numbers), shown
as given with the run's own strategy highlighted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from pipeline.config import ViewsConfig
from pipeline.preprocess.cache import VIEW_NAMES, load_entry
from pipeline.preprocess.views import PROJECTION_CHANNELS
from pipeline.report import plots
from pipeline.report.blocks import Cell, Figures, Note, Section, Table, cell, decimals_apart, guard
from pipeline.report.curves import training_curves
from pipeline.report.inputs import RunFolder

__all__ = [
    "DEFINITIONS",
    "METRIC_LABELS",
    "classifier_section",
    "montage_picks",
    "montage_row",
    "threshold_digits",
]

METRIC_LABELS = {
    "sensitivity": "Sensitivity (recall)",
    "precision": "Precision (PPV)",
    "f1": "F1 score",
    "specificity": "Specificity",
    "balanced_accuracy": "Balanced accuracy",
    "auc": "ROC AUC",
    "accuracy": "Accuracy",
}
EMPHASISED = ("sensitivity", "precision", "f1")
DEFINITIONS = [
    (
        "Sensitivity",
        "TP / (TP + FN): the share of positive cases the model finds. Missed disease costs most.",
    ),
    ("Precision", "TP / (TP + FP): the share of positive calls that are right (positive predictive value)."),
    ("F1", "the harmonic mean of precision and sensitivity; it is low if either is low."),
    ("Specificity", "TN / (TN + FP): the share of negative cases called negative."),
    ("Balanced accuracy", "(sensitivity + specificity) / 2; unaffected by class imbalance."),
    (
        "ROC AUC",
        "the probability that a random positive case scores above a random negative one (threshold-free).",
    ),
    (
        "Accuracy",
        "(TP + TN) / N. Misleading with imbalanced classes: calling every case negative in a "
        "cohort with 20% positives scores 0.80. Read sensitivity, precision and F1 first.",
    ),
    (
        "95% CI",
        "percentile bootstrap over test cases with the threshold held fixed; where that has no width "
        "(a proportion of 0 or 1), the exact Clopper-Pearson interval of the counts (marked †).",
    ),
]
CATEGORIES = {  # (label, prediction) → title, colour; the most confident examples are shown
    "TP": ((1, 1), "true positive", plots.COLORS[2]),
    "FP": ((0, 1), "false positive", plots.COLORS[3]),
    "FN": ((1, 0), "false negative", plots.COLORS[1]),
}


# the metrics that are one count over another in the confusion matrix [[TN, FP], [FN, TP]]
PROPORTIONS = {
    "sensitivity": lambda tn, fp, fn, tp: (tp, tp + fn),
    "specificity": lambda tn, fp, fn, tp: (tn, tn + fp),
    "precision": lambda tn, fp, fn, tp: (tp, tp + fp),
    "accuracy": lambda tn, fp, fn, tp: (tp + tn, tn + fp + fn + tp),
}
EXACT_MARK = "†"


def _with_ci(name: str, at: dict[str, Any]) -> Cell:
    """A metric with its bootstrap CI; where that has no width (a proportion of 0 or 1, or very few
    cases, where resampling cannot vary it) the exact Clopper-Pearson interval of its counts instead."""
    metric = at[name]
    value, low, high = (metric.get(k) for k in ("value", "ci_low", "ci_high"))
    if value is None or not math.isfinite(float(value)):
        return Cell("undefined", cls="num")
    if low is not None and low == high and name in PROPORTIONS and "confusion_matrix" in at:
        k, n = PROPORTIONS[name](*np.ravel(at["confusion_matrix"]).tolist())
        if n > 0:
            interval = binomtest(int(k), int(n)).proportion_ci(0.95, method="exact")
            return Cell(
                f"{cell(value).text} [{cell(interval.low).text}, {cell(interval.high).text}]{EXACT_MARK}",
                cls="num",
            )
    ci = f" [{cell(low).text}, {cell(high).text}]" if low is not None else ""
    return Cell(f"{cell(value).text}{ci}", cls="num")


def threshold_digits(run: RunFolder, metrics: dict[str, Any]) -> int:
    """Decimals to show the chosen threshold and test probabilities with, so that no test case's
    probability reads the same as the threshold it was called against (3 at least)."""
    at = metrics.get("test", {}).get("at_val_threshold", {})
    if "threshold" not in at or not run.has("classify/test_predictions.csv"):
        return 3
    scores = [float(v) for v in run.columns("classify/test_predictions.csv").get("probability", [])]
    return decimals_apart(scores, float(at["threshold"]))


def _excluded_note(run: RunFolder, excluded: list[str], classes: list[str]) -> str:
    """The test cases that failed preprocessing, with their labels: the metrics leave them out."""
    if not excluded:
        return ""
    labels = {r["case_id"]: r.get("label", "") for r in run.csv("preprocess/cases.csv")}
    named = [
        f"{cid} ({classes[int(labels[cid])]})"
        if labels.get(cid, "").isdigit() and int(labels[cid]) < len(classes)
        else cid
        for cid in excluded
    ]
    return (
        f" {len(excluded)} test case(s) failed preprocessing and are not scored: {', '.join(named)} "
        "(the preprocess ledger says why)."
    )


def _metrics_table(run: RunFolder, metrics: dict[str, Any], digits: int) -> list:
    test = metrics["test"]
    columns = {k: test[k] for k in ("at_val_threshold", "at_0.5") if k in test}
    header = ["metric"] + [
        f"{'chosen' if k == 'at_val_threshold' else 'default'} threshold t = {v['threshold']:.{digits}f}"
        for k, v in columns.items()
    ]
    names = [m for m in METRIC_LABELS if any(m in v for v in columns.values())]
    body = [
        [Cell(METRIC_LABELS[m]), *(_with_ci(m, v) if m in v else Cell("–") for v in columns.values())]
        for m in names
    ]
    shown = " ".join(c.text for row in body for c in row)
    flat = any(
        m not in PROPORTIONS and v.get(m, {}).get("ci_low") is not None and v[m]["ci_low"] == v[m]["ci_high"]
        for v in columns.values()
        for m in names
    )
    remarks = [
        " A CI of no width: every bootstrap resample gave the same value (a perfect score, or few cases)."
        if flat
        else "",
        f" {EXACT_MARK} An exact (Clopper-Pearson) 95% interval of the counts: the bootstrap's has no "
        "width at a proportion of 0 or 1."
        if EXACT_MARK in shown
        else "",
        " Undefined: the metric's denominator is 0 (e.g. precision with no positive call)."
        if "undefined" in shown
        else "",
    ]
    classes = metrics.get("classes", ["negative", "positive"])
    note = (
        f"Test split: {test.get('n', '?')} cases, {test.get('positives', '?')} positive "
        f"(positive class: {classes[-1]}). Threshold chosen on {chosen_on(metrics)} by "
        f"{metrics.get('threshold_method', '?')}; values with 95% bootstrap CI ({metrics.get('n_boot', '?')} "
        "resamples)." + _excluded_note(run, test.get("excluded") or [], classes) + "".join(remarks)
    )
    return [
        Table(
            "Test metrics at the chosen threshold and at 0.5",
            header,
            body,
            emphasis={names.index(m) for m in EMPHASISED if m in names},
            muted={names.index("accuracy")} if "accuracy" in names else set(),
            note=note,
        )
    ]


def chosen_on(metrics: dict[str, Any]) -> str:
    """The cases the evaluation chose its threshold on: val, and a fold ensemble's out-of-fold scores."""
    cases = metrics.get("threshold_cases") or {}
    if cases.get("out_of_fold"):
        return (
            f"validation and the training cases' out-of-fold scores ({cases['val']} + {cases['out_of_fold']})"
        )
    return "validation"


def _confusion(metrics: dict[str, Any], figures: Figures, digits: int) -> list:
    test = metrics["test"]
    matrices = {
        f"{'chosen' if k == 'at_val_threshold' else 'default'} t = {test[k]['threshold']:.{digits}f}": test[
            k
        ]["confusion_matrix"]
        for k in ("at_val_threshold", "at_0.5")
        if k in test
    }
    fig = plots.confusion_matrices(matrices, metrics.get("classes", ["0", "1"]))
    caption = "Test confusion matrices: counts and the share of each true class (row)."
    return [figures.add(fig, "classify_confusion", caption, "confusion matrices")]


def _thresholds(metrics: dict[str, Any]) -> dict[str, float]:
    test = metrics["test"]
    names = {"at_val_threshold": "chosen threshold", "at_0.5": "threshold 0.5"}
    return {name: float(test[k]["threshold"]) for k, name in names.items() if k in test}


def _test_scores(run: RunFolder) -> tuple[np.ndarray, np.ndarray]:
    """Labels and positive-class probabilities of the test cases; both classes must be present."""
    pred = run.columns("classify/test_predictions.csv")
    labels = np.array([int(v) for v in pred["label"]])
    if len(np.unique(labels)) < 2:
        raise ValueError("the test split holds one class only")
    return labels, np.array([float(v) for v in pred["probability"]])


def _roc_pr(run: RunFolder, metrics: dict[str, Any], figures: Figures) -> list:
    fig = plots.roc_pr(*_test_scores(run), _thresholds(metrics))
    caption = (
        "ROC and precision-recall curves on the test split, with the operating points of the chosen "
        "threshold (filled) and of 0.5 (hollow)."
    )
    return [figures.add(fig, "classify_roc_pr", caption, "ROC and precision-recall curves")]


def _calibration(run: RunFolder, figures: Figures) -> list:
    caption = (
        "Calibration on the test split: the observed share of positives per bin of predicted probability "
        "(the diagonal is perfect); below, the probability histogram."
    )
    return [
        figures.add(
            plots.calibration(*_test_scores(run)), "classify_calibration", caption, "calibration curve"
        )
    ]


def montage_picks(rows: list[dict[str, str]], per_category: int = 2) -> list[tuple[str, dict[str, str]]]:
    """The most confident true positives and false positives, and the least confident false negatives."""
    picks = []
    for key, ((label, prediction), _, _) in CATEGORIES.items():
        found = [r for r in rows if int(r["label"]) == label and int(r["prediction"]) == prediction]
        found.sort(key=lambda r: float(r["probability"]), reverse=key != "FN")
        picks += [(key, r) for r in found[:per_category]]
    return picks


def montage_row(
    entry: Path, title: str, channel: int | None = None, color: str = plots.INK, blocks: int = 1
) -> plots.ViewRow:
    """A montage row from a cache entry's views, as cached (display orientation), one channel each.

    ``channel`` defaults to the middle one of the image's slab (the first of ``blocks`` slabs).
    """
    views = load_entry(entry)[0]["views"]
    c = views.shape[1] // blocks // 2 if channel is None else channel
    return plots.ViewRow(title, [views[v, c] for v in range(min(len(views), len(VIEW_NAMES)))], color=color)


def _montage(run: RunFolder, figures: Figures, digits: int) -> list:
    pred = run.csv("classify/test_predictions.csv")
    cache = {r["case_id"]: r["cache"] for r in run.csv("preprocess/cases.csv") if r.get("cache")}
    params = run.json("preprocess/params.json").get("preprocess", {})
    views = ViewsConfig.model_validate(params.get("views", {}))
    # of the projections, a MIP within the mask is where a nodule shows; a whole-body MIP is mostly
    # bone, so then the centre slice
    channel, shown = None, "the middle slice of each view"
    if views.mode == "projections" and views.within_mask:
        channel, shown = PROJECTION_CHANNELS.index("max"), "the maximum-intensity projection within the mask"
    elif views.mode == "projections":
        channel, shown = PROJECTION_CHANNELS.index("slice"), "the centre slice"
    picks = [(k, r) for k, r in montage_picks(pred) if r["case_id"] in cache]
    if not picks:
        raise ValueError("no test case with a cache entry to show")
    rows = [
        montage_row(
            run.path(f"preprocess/{cache[r['case_id']]}"),
            f"{CATEGORIES[k][1]}\n{r['case_id']}\np = {float(r['probability']):.{digits}f}",
            channel,
            CATEGORIES[k][2],
            views.blocks,
        )
        for k, r in picks
    ]
    absent = [CATEGORIES[k][1] + "s" for k in CATEGORIES if k not in {k for k, _ in picks}]
    caption = (
        "Examples from the test split in axial, coronal and sagittal views, as the model sees them "
        f"({shown}; radiological display: patient right on image left; anterior up in axial; "
        "superior up in coronal and sagittal; anterior left in sagittal). "
        "p is the predicted probability of the positive class."
        + (f" No {' or '.join(absent)} in the test split." if absent else "")
    )
    return [
        figures.add(plots.view_grid(rows), "classify_montage", caption, "three-view montage of test cases")
    ]


def _balance_comparison(run: RunFolder) -> list:
    rows = run.csv("classify/balance_comparison.csv")
    if not rows:
        raise ValueError("classify/balance_comparison.csv has no rows")
    current = run.json("classify/balance.json")["strategy"] if run.has("classify/balance.json") else None
    header = list(rows[0])
    body = [[cell(r[h]) for h in header] for r in rows]
    chosen = {i for i, r in enumerate(rows) if r.get("strategy") == current}
    note = f"Bold: this run's strategy ({current})." if chosen else ""
    return [Table("Class-balancing strategies compared", header, body, emphasis=chosen, note=note)]


def classifier_section(run: RunFolder, figures: Figures) -> Section:
    """Section 2; parts whose inputs are missing become one-line notes."""
    section = Section("classifier", "Classifier")
    if not run.has("classify"):
        section.blocks.append(Note(f"Classifier omitted: no {run.root.name}/classify folder"))
        return section
    section.definitions = DEFINITIONS
    blocks = section.blocks
    guard(
        blocks,
        "Training curves",
        lambda: training_curves(
            run, figures, "classify", {"val_auc": "val AUC", "val_balanced_accuracy": "val balanced accuracy"}
        ),
    )
    digits = 3
    try:
        metrics = run.json("classify/metrics.json")
    except (OSError, ValueError) as exc:
        blocks.append(Note(f"Test metrics, confusion matrix, ROC/PR and calibration omitted: {exc}"))
    else:
        section.lead = f"Positive class: {metrics.get('classes', ['', '?'])[-1]}."
        digits = threshold_digits(run, metrics)
        guard(blocks, "Metrics table", lambda: _metrics_table(run, metrics, digits))
        guard(blocks, "Confusion matrix", lambda: _confusion(metrics, figures, digits))
        guard(blocks, "Calibration curve", lambda: _calibration(run, figures))
        guard(blocks, "ROC and precision-recall curves", lambda: _roc_pr(run, metrics, figures))
    guard(blocks, "Three-view montage", lambda: _montage(run, figures, digits))
    if run.has("classify/balance_comparison.csv"):
        guard(blocks, "Balancing comparison", lambda: _balance_comparison(run))
    return section
