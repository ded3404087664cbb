"""Classification metrics against a hand-computed confusion matrix; threshold choice on validation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.classification import binary_metrics, choose_threshold, metrics_with_ci

# 10 cases; at threshold 0.5: TP = 3 (0.9, 0.8, 0.6), FN = 1 (0.3), FP = 2 (0.7, 0.55), TN = 4
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])


def test_metrics_match_hand_computed_confusion_matrix():
    m = binary_metrics(LABELS, SCORES, 0.5)
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    # AUC: of 24 positive-negative pairs, the positive scores higher in 20
    assert m["auc"] == pytest.approx(20 / 24)


def test_threshold_moves_predictions():
    m = binary_metrics(LABELS, SCORES, 0.75)
    assert m["confusion_matrix"] == [[6, 0], [2, 2]]


@pytest.mark.parametrize("method", ["youden", "balanced_accuracy"])
def test_threshold_maximises_balanced_accuracy_on_validation(method):
    t = choose_threshold(LABELS, SCORES, method)
    best = max(binary_metrics(LABELS, SCORES, c)["balanced_accuracy"] for c in np.append(SCORES, 1.1))
    assert binary_metrics(LABELS, SCORES, t)["balanced_accuracy"] == pytest.approx(best)
    assert (
        binary_metrics(LABELS, SCORES, t)["balanced_accuracy"]
        > binary_metrics(LABELS, SCORES, 0.5)["balanced_accuracy"]
    )


def test_threshold_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.zeros(4), np.linspace(0, 1, 4))


def test_confidence_intervals_bracket_the_estimate():
    rng = np.random.default_rng(0)
    labels = np.repeat(LABELS, 10)
    scores = np.clip(np.repeat(SCORES, 10) + rng.normal(0, 0.05, 100), 0, 1)
    m = metrics_with_ci(labels, scores, 0.5, n_boot=200)
    for name in ("auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1"):
        v = m[name]
        assert v["ci_low"] <= v["value"] <= v["ci_high"] and v["ci_high"] - v["ci_low"] < 0.5
    assert m["accuracy"]["ci_high"] - m["accuracy"]["ci_low"] > 0.02
    assert sum(map(sum, m["confusion_matrix"])) == 100 and m["threshold"] == 0.5


def test_undefined_metrics_are_null_in_strict_json(tmp_path):
    """A test split without positives has no sensitivity; no positive prediction, no precision.
    Both are NaN in memory and null on disk (strict JSON, as browsers parse it), not 0."""
    import json

    from pipeline.io import write_json

    no_positives = metrics_with_ci(np.array([0, 0, 0, 0]), np.array([0.1, 0.7, 0.2, 0.3]), 0.5, n_boot=50)
    assert np.isnan(no_positives["sensitivity"]["value"]) and no_positives["specificity"]["value"] == 0.75
    nothing_called = metrics_with_ci(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0.9, n_boot=50)
    assert np.isnan(nothing_called["precision"]["value"]) and nothing_called["sensitivity"]["value"] == 0.0

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    path = write_json(tmp_path / "metrics.json", {"test": no_positives, "inf": float("inf")})
    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["test"]["sensitivity"] == {"value": None, "ci_low": None, "ci_high": None}
    assert data["test"]["specificity"]["value"] == 0.75 and data["inf"] is None


def test_balanced_accuracy_ci_skips_one_class_resamples():
    """No positive is ever called: every resample that holds both classes has balanced accuracy
    0.5. A resample without positives is not a balanced accuracy of 1.0 (its specificity alone)."""
    labels, scores = np.array([0] * 18 + [1] * 2), np.full(20, 0.1)
    ci = metrics_with_ci(labels, scores, 0.5, n_boot=300)["balanced_accuracy"]
    assert ci == {"value": 0.5, "ci_low": 0.5, "ci_high": 0.5}
