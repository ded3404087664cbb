"""Percentile bootstrap confidence intervals over cases."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    metric: Callable[..., float],
    *columns: Sequence | np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Return (estimate, low, high): the metric on all cases and its (1 - alpha) percentile interval.

    Cases are resampled with replacement, the same indices for every column. Resamples on which the
    metric is undefined (it raises ValueError or returns NaN, e.g. AUC with one class) are skipped.

    Example:
        >>> est, lo, hi = bootstrap_ci(np.mean, np.arange(10.0), n_boot=200)
        >>> est, lo <= est <= hi
        (4.5, True)
    """
    arrays = [np.asarray(c) for c in columns]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("bootstrap_ci: columns differ in length")
    estimate = float(metric(*arrays))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            value = float(metric(*(a[idx] for a in arrays)))
        except ValueError:
            continue
        if np.isfinite(value):
            values.append(value)
    if not values:
        return estimate, float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return estimate, float(low), float(high)
