"""The dataset fingerprint: what the cohort looks like before anyone plans a model on it.

After nnU-Net's dataset fingerprint (Isensee et al., Nat Methods 2021): spacing and size
distributions, intensity percentiles inside the foreground, orientations, and class counts per split.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from pipeline.batch import Row
from pipeline.manifest import CaseSet

__all__ = ["fingerprint"]


def _summary(values: list[list[float]]) -> dict[str, list[float]]:
    """Per-axis min, median and max of a list of 3-vectors."""
    arr = np.asarray(values, dtype=float)
    return {
        k: np.round(f(arr, axis=0), 4).tolist()
        for k, f in (("min", np.min), ("median", np.median), ("max", np.max))
    }


def fingerprint(case_set: CaseSet, rows: dict[str, Row], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Summarise the run: ledger totals, geometry and intensity distributions, class counts."""
    done = [s for s in stats.values()]
    percentiles = [s["intensity_percentiles"] for s in done if s.get("intensity_percentiles")]
    classes: dict[str, dict[str, int]] = {}
    for case in case_set.cases:
        if case.label is None or case.case_id not in stats:
            continue
        split = classes.setdefault(case.split or "all", {name: 0 for name in case_set.classes})
        split[case_set.classes[case.label]] += 1
    return {
        "cases": len(case_set.cases),
        "status": dict(Counter(r.status for r in rows.values())),
        "classes": case_set.classes,
        "class_counts": classes,
        "native_spacing_mm": _summary([s["native_spacing"] for s in done]) if done else None,
        "native_shape": _summary([s["native_shape"] for s in done]) if done else None,
        "output_spacing_mm": _summary([s["spacing"] for s in done]) if done else None,
        "orientations": dict(Counter(s["axcodes"] for s in done)),
        "oblique_cases": sum(s["oblique"] for s in done),
        "foreground_intensity_percentiles": {
            "p0.5": float(np.median([p[0] for p in percentiles])),
            "p50": float(np.median([p[1] for p in percentiles])),
            "p99.5": float(np.median([p[2] for p in percentiles])),
        }
        if percentiles
        else None,
    }
