"""The report's figures: one function per figure, one style, matplotlib's object API (Agg).

Every function returns a ``matplotlib.figure.Figure`` (no pyplot state, so figures are safe to make
from any thread and are garbage-collected); ``png`` renders one as PNG bytes, which
``blocks.Figures`` saves. Colours come from the Okabe-Ito palette, which stays distinguishable for
colour-blind readers.

Example:
    >>> fig = training_curves([0, 1], [0.7, 0.5], {"val AUC": [0.6, 0.8]}, [1e-3, 5e-4], best_epoch=1)
    >>> png(fig)[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ParamSpec

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from sklearn.calibration import calibration_curve
from sklearn.metrics import auc, precision_recall_curve, roc_curve

__all__ = [
    "COLORS",
    "VIEW_EDGES",
    "ViewRow",
    "calibration",
    "class_balance",
    "confusion_matrices",
    "distribution",
    "png",
    "roc_pr",
    "training_curves",
    "view_grid",
]

# Okabe-Ito: blue, orange, bluish green, vermillion, reddish purple, sky blue, yellow.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
INK, GRID = "#1f2a37", "#d9dee5"
TRUTH, PREDICTION = "#00C08B", "#FF8C00"
# Patient directions at the (left, right, top, bottom) image edges of each displayed view
# (radiological convention; see pipeline.preprocess.views).
VIEW_EDGES = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.edgecolor": "#9aa5b1",
    "axes.labelcolor": INK,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=COLORS),
    "xtick.color": INK,
    "ytick.color": INK,
    "text.color": INK,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "text.parse_math": False,  # a case id such as scan_$x^2$ is shown as it is, not as maths
}
P = ParamSpec("P")
WIDTH = 10.0  # inches: 1100 px at 110 dpi, the page's content width


def _figure(height: float, width: float = WIDTH) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, at the report's resolution."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=STYLE["savefig.dpi"], facecolor="white")
    return buffer.getvalue()


def _styled(fn: Callable[P, Figure]) -> Callable[P, Figure]:
    """Run a figure function under the report style, so every artist it makes gets it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


@_styled
def class_balance(before: Mapping[str, float], after: Mapping[str, float], strategy: str) -> Figure:
    """Grouped bars: training cases per class before balancing and per epoch after it."""
    fig = _figure(2.6, 5.0)
    ax = fig.add_subplot()
    names = list(before)
    x = np.arange(len(names))
    for offset, (label, counts, color) in enumerate(
        [("before (training split)", before, COLORS[0]), (f"after: {strategy} (per epoch)", after, COLORS[1])]
    ):
        values = [float(counts.get(n, 0)) for n in names]
        bars = ax.bar(x + (offset - 0.5) * 0.38, values, 0.36, label=label, color=color)
        ax.bar_label(bars, fmt="%.4g", fontsize=8, padding=2)
    ax.set_xticks(x, names)
    ax.set_ylabel("cases")
    ax.margins(y=0.18)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", ncols=2, bbox_to_anchor=(0, 1.14))
    return fig


@_styled
def training_curves(
    epochs: Sequence[float],
    loss: Sequence[float],
    validation: Mapping[str, Sequence[float]],
    lr: Sequence[float] | None,
    best_epoch: int | None = None,
) -> Figure:
    """Three panels over epochs: training loss, validation metrics, learning rate; best epoch marked."""
    fig = _figure(2.6)
    axes = fig.subplots(1, 3)
    panels = [("training loss", {"train loss": loss}, COLORS[:1]), ("validation", validation, COLORS[2:])]
    if lr is not None:
        panels.append(("learning rate", {"lr": lr}, COLORS[4:]))
    for ax, (title, series, colors) in zip(axes, panels, strict=False):
        for (name, values), color in zip(series.items(), colors, strict=False):
            ax.plot(epochs, values, marker="o", markersize=3, lw=1.6, label=name, color=color)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if len(epochs) <= 12:
            ax.set_xticks(list(epochs))
        else:
            ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="#7b8794", ls="--", lw=1, label="best epoch")
        if title == "validation":
            ax.legend(loc="best")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig


@_styled
def confusion_matrices(matrices: Mapping[str, Sequence[Sequence[int]]], classes: Sequence[str]) -> Figure:
    """One 2x2 confusion matrix ([[TN, FP], [FN, TP]]) per threshold, counts and row percentages."""
    fig = _figure(2.7, 2.6 * len(matrices) + 0.6)
    axes = np.atleast_1d(fig.subplots(1, len(matrices)))
    for ax, (title, matrix) in zip(axes, matrices.items(), strict=True):
        m = np.asarray(matrix, dtype=float)
        rows = m.sum(1, keepdims=True)
        share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for (r, c), count in np.ndenumerate(m):
            color = "white" if share[r, c] > 0.55 else INK
            ax.text(c, r, f"{int(count)}\n{share[r, c]:.0%}", ha="center", va="center", color=color)
        ax.set_xticks([0, 1], [f"pred. {n}" for n in classes])
        ax.set_yticks([0, 1], [f"true {n}" for n in classes], rotation=90, va="center")
        ax.grid(False)
        ax.set_title(title)
    return fig


def _operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    pred = scores >= threshold
    pos, neg = labels == 1, labels == 0
    tp = float(np.sum(pred & pos))
    return {
        "tpr": tp / max(pos.sum(), 1),
        "fpr": float(np.sum(pred & neg)) / max(neg.sum(), 1),
        "precision": tp / pred.sum() if pred.any() else float("nan"),  # undefined: not drawn
    }


@_styled
def roc_pr(labels: Sequence[int], scores: Sequence[float], thresholds: Mapping[str, float]) -> Figure:
    """ROC and precision-recall curves of the test cases, each threshold's operating point marked."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    fig = _figure(3.5, 7.4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    fpr, tpr, _ = roc_curve(y, s)
    ax_roc.plot(fpr, tpr, lw=2, color=COLORS[0], label=f"ROC (AUC {auc(fpr, tpr):.3f})")
    ax_roc.plot([0, 1], [0, 1], color="#9aa5b1", ls=":", lw=1, label="chance")
    precision, recall, _ = precision_recall_curve(y, s)
    ax_pr.step(recall, precision, where="post", lw=2, color=COLORS[0], label="precision-recall")
    ax_pr.axhline(y.mean(), color="#9aa5b1", ls=":", lw=1, label=f"prevalence {y.mean():.2f}")
    styles = (  # the chosen threshold filled on top; 0.5 hollow and larger, visible even if they coincide
        {"marker": "o", "ms": 8, "color": COLORS[3], "mec": "white", "zorder": 5},
        {"marker": "D", "ms": 11, "color": COLORS[2], "mfc": "none", "mew": 2, "zorder": 4},
    )
    for (name, t), style in zip(thresholds.items(), styles, strict=False):
        p = _operating_point(y, s, t)
        label = f"{name} (t={t:.3f})" + ("; no positive call" if np.isnan(p["precision"]) else "")
        ax_roc.plot(p["fpr"], p["tpr"], ls="none", label=label, **style)
        ax_pr.plot(p["tpr"], p["precision"], ls="none", label=label, **style)
    for ax, title, xl, yl in (
        (ax_roc, "ROC", "1 − specificity (false-positive rate)", "sensitivity"),
        (ax_pr, "precision-recall", "recall (sensitivity)", "precision"),
    ):
        ax.set(title=title, xlabel=xl, ylabel=yl, xlim=(-0.02, 1.02), ylim=(-0.02, 1.04))
        ax.set_aspect("equal")
        ax.legend(loc="lower right" if ax is ax_roc else "lower left")
    return fig


@_styled
def calibration(labels: Sequence[int], scores: Sequence[float], bins: int = 10) -> Figure:
    """Reliability diagram (observed positive fraction per probability bin) over a score histogram."""
    y, s = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    fig = _figure(3.3, 3.6)
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    observed, predicted = calibration_curve(y, s, n_bins=bins, strategy="uniform")
    ax.plot([0, 1], [0, 1], color="#9aa5b1", ls=":", lw=1, label="perfect calibration")
    ax.plot(predicted, observed, marker="o", lw=1.8, color=COLORS[0], label="model")
    ax.set(ylabel="observed positive fraction", ylim=(-0.02, 1.02), title="calibration (test)")
    ax.legend(loc="upper left")
    edges = np.linspace(0, 1, bins + 1)
    hist.hist(
        [s[y == 0], s[y == 1]], bins=edges, stacked=True, color=(COLORS[5], COLORS[3]), label=("neg.", "pos.")
    )
    hist.set(xlabel="predicted probability", ylabel="cases", xlim=(0, 1))
    hist.legend(loc="upper center", ncols=2)
    return fig


@dataclass
class ViewRow:
    """One montage row: up to three display-ready (H, W) views with optional contours.

    ``views`` are in the order of ``pipeline.preprocess.cache.VIEW_NAMES`` and shown exactly as
    given (``origin="upper"``, no flips). ``aspect`` is the row/column pixel-spacing ratio per view.
    """

    title: str
    views: Sequence[np.ndarray]
    truth: Sequence[np.ndarray] | None = None
    prediction: Sequence[np.ndarray] | None = None
    aspect: Sequence[float] | None = None
    color: str = INK


@_styled
def view_grid(rows: Sequence[ViewRow], names: Sequence[str] = tuple(VIEW_EDGES)) -> Figure:
    """Rows of axial, coronal and sagittal views with orientation letters, optionally contoured."""
    fig = _figure(2.1 * len(rows) + 0.5, 7.0)
    axes = np.asarray(fig.subplots(len(rows), len(names), squeeze=False))
    for r, row in enumerate(rows):
        stack = np.concatenate([np.ravel(v) for v in row.views]).astype(np.float32)
        vmin, vmax = np.percentile(stack, (1, 99.5)) if stack.size else (0, 1)
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(row.title, color=row.color, fontsize=9, fontweight="bold")
            if c >= len(row.views):
                ax.text(0.5, 0.5, "n/a (2D image)", ha="center", va="center", transform=ax.transAxes)
                continue
            aspect = row.aspect[c] if row.aspect is not None else 1.0
            ax.imshow(row.views[c], cmap="gray", vmin=vmin, vmax=vmax, origin="upper", aspect=aspect)
            for masks, color in ((row.truth, TRUTH), (row.prediction, PREDICTION)):
                if masks is not None and np.any(masks[c]) and not np.all(masks[c]):
                    ax.contour(masks[c] > 0, levels=[0.5], colors=color, linewidths=1.3)
            left, right, top, bottom = VIEW_EDGES[name]
            for x, y, letter in (
                (0.02, 0.5, left),
                (0.98, 0.5, right),
                (0.5, 0.98, top),
                (0.5, 0.02, bottom),
            ):
                ax.text(
                    x,
                    y,
                    letter,
                    transform=ax.transAxes,
                    color="#ffd166",
                    fontsize=8,
                    fontweight="bold",
                    ha={0.02: "left", 0.98: "right"}.get(x, "center"),
                    va={0.98: "top", 0.02: "bottom"}.get(y, "center"),
                )
    if any(row.truth is not None for row in rows):
        handles = [
            mpl.lines.Line2D([], [], color=TRUTH, lw=2, label="reference (truth)"),
            mpl.lines.Line2D([], [], color=PREDICTION, lw=2, label="prediction"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2)
    return fig


@_styled
def distribution(values: Mapping[str, Sequence[float]]) -> Figure:
    """One panel per metric: a box plot with every case as a jittered point."""
    fig = _figure(2.6, 2.6 * len(values) + 0.4)
    axes = np.atleast_1d(fig.subplots(1, len(values)))
    rng = np.random.default_rng(0)
    for ax, (name, data), color in zip(axes, values.items(), COLORS, strict=False):
        v = np.asarray(data, dtype=float)
        v = v[np.isfinite(v)]
        ax.boxplot(v, widths=0.5, showfliers=False, medianprops={"color": INK})
        ax.scatter(1 + rng.uniform(-0.15, 0.15, v.size), v, s=16, color=color, alpha=0.8, zorder=3)
        ax.set_title(name)
        ax.set_xticks([])
        ax.text(0.98, 0.02, f"n={v.size}", transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    return fig
