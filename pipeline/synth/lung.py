"""What lies inside the lungs: branching vessel trees (both classes) and the lesion (positives only).

Vessels grow from each hilum as seven trunks that split in two, level after level, with thinner and
shorter branches; a branch whose end would leave the lung is re-aimed or dropped. They are painted
with a partial-volume edge, so thin vessels look faint on coarse grids, and only inside the lung mask.

The lesion is a nodule or mass: an ellipsoid of 5-15 mm radius (at least two voxels on coarse
grids), optionally lobulated, of soft-tissue density (15-65 HU), placed by rejection so that it and
a margin of 2 mm (or one voxel) lie wholly inside one lung. Its voxels stay in the lung mask: a lung
mask covers the whole lung, pathology included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.anatomy import Anatomy, Lung
from pipeline.synth.shapes import Grid, segment_distance

__all__ = ["Lesion", "paint_lesion", "paint_vessels", "place_lesion"]

# Trunk directions (lateral, anterior, superior) from the hilum; lateral is mirrored per side.
TRUNKS = (
    (0.3, 0.6, 1.0),
    (0.3, -0.6, 1.0),
    (1.0, 0.2, 0.5),
    (1.0, -0.2, -0.4),
    (0.3, 1.0, -0.1),
    (0.3, 0.1, -1.0),
    (0.25, -1.0, -0.6),
)
LEVELS = 6


@dataclass(frozen=True)
class Lesion:
    """A placed lesion (local mm)."""

    centre: tuple[float, float, float]
    radius: float  # mean radius
    axes: np.ndarray  # 3x3 rotation; rows are the ellipsoid's axes
    scales: tuple[float, float, float]  # semi-axes
    lobes: tuple[tuple[tuple[float, float, float], float], ...]  # (direction, amplitude)
    value: float
    label: int


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _in_lung(grid: Grid, mask: np.ndarray, point: np.ndarray, label: int) -> bool:
    ijk = grid.index(point)
    return ijk is not None and mask[ijk] == label


def _aim(
    rng: np.random.Generator, grid: Grid, mask: np.ndarray, label: int, start: np.ndarray, spec: tuple
) -> tuple[np.ndarray, float] | None:
    """A direction and length from ``start`` whose end lies in the lung, or None after 8 tries.

    ``spec`` is (axis, sign, min_deg, max_deg, length): directions turn away from ``axis``.
    """
    axis, sign, lo, hi, length = spec
    for attempt in range(8):
        perp = _unit(np.cross(axis, rng.normal(size=3)))
        d = _unit(axis + sign * np.tan(np.deg2rad(rng.uniform(lo, hi))) * perp)
        reach = length * rng.uniform(0.8, 1.05) * (0.5 if attempt >= 4 else 1.0)
        if _in_lung(grid, mask, start + d * reach, label):
            return d, reach
    return None


def _branches(
    rng: np.random.Generator, grid: Grid, mask: np.ndarray, start: np.ndarray, lung: Lung
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Segments (p0, p1, r0, r1) of one lung's vessel tree; its size follows the lung's."""
    side, label = np.sign(lung.cx), lung.label
    scale = np.sqrt(lung.w * lung.h) / 75.0
    segments = []
    stack = []
    for trunk in TRUNKS:
        axis = _unit(np.array([side * trunk[0], trunk[1], trunk[2]]))
        aimed = _aim(rng, grid, mask, label, start, (axis, 1.0, 0, 15, scale * rng.uniform(35, 55)))
        if aimed is not None:
            stack.append((start, *aimed, scale * rng.uniform(3.0, 4.0), 0))
    while stack:
        p0, d, length, r0, level = stack.pop()
        p1 = p0 + d * length
        segments.append((p0, p1, r0, r0 * 0.85))
        if level + 1 >= LEVELS:
            continue
        for sign in (1.0, -1.0):
            aimed = _aim(rng, grid, mask, label, p1, (d, sign, 20, 45, length * 0.8))
            if aimed is not None:
                stack.append((p1, *aimed, r0 * 0.72, level + 1))
    return segments


def paint_vessels(
    rng: np.random.Generator, grid: Grid, image: np.ndarray, mask: np.ndarray, an: Anatomy
) -> None:
    """Grow and paint both lungs' vessel trees (in place, inside the lung mask only)."""
    edge = np.float32(min(grid.spacing[:2]))
    value = np.float32(an.hu.vessel)
    for lung, (end, _) in zip(an.lungs, an.bronchi, strict=True):
        hilum = np.asarray(end) + np.array([0.0, rng.uniform(5, 12), rng.uniform(-5, 10)])
        for p0, p1, r0, r1 in _branches(rng, grid, mask, hilum, lung):
            box, dist, t = segment_distance(grid, p0, p1, r0 + float(edge))
            alpha = np.clip((r0 + (r1 - r0) * t - dist) / edge + 0.5, 0.0, 1.0)
            sub = image[box]
            painted = np.maximum(sub, sub + (value - sub) * alpha)
            sub[...] = np.where(mask[box] == lung.label, painted, sub)


def _lesion_rho(grid: Grid, lesion: Lesion, margin: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """The lesion's box (grown by ``margin`` mm) and each voxel's normalised radius (1 on its surface)."""
    reach = max(lesion.scales) * (1 + sum(abs(a) for _, a in lesion.lobes)) + margin
    box, (dx, dy, dz) = grid.around(lesion.centre, reach)
    ax = lesion.axes.astype(np.float32)
    u = [(ax[i, 0] * dx + ax[i, 1] * dy + ax[i, 2] * dz) for i in range(3)]
    dist = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + np.float32(1e-6)
    rho = np.sqrt(sum((u[i] / lesion.scales[i]) ** 2 for i in range(3)))
    bump = 1.0 + sum(a * ((d[0] * dx + d[1] * dy + d[2] * dz) / dist) ** 3 for d, a in lesion.lobes)
    return box, rho / bump


def place_lesion(rng: np.random.Generator, grid: Grid, mask: np.ndarray, an: Anatomy) -> Lesion:
    """Draw a lesion and a centre such that it, plus a margin of 2 mm or one voxel, lies in one lung."""
    lung = an.lungs[int(rng.integers(2))]
    low = min(max(5.0, 2.0 * max(grid.spacing[:2])), 15.0)
    radius = rng.uniform(low, 15.0)
    axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    stretch = rng.uniform(0.8, 1.2, 3)
    lobulated = rng.random() < 0.5
    lobes = tuple(
        (tuple(_unit(rng.normal(size=3))), rng.uniform(-0.2, 0.2) if lobulated else 0.0) for _ in range(3)
    )
    value = rng.uniform(15, 65)
    lo, hi = (np.asarray(v) for v in lung.bounds())
    margin = max(2.0, *grid.spacing[:2])
    for attempt in range(400):
        r = radius * 0.9 ** (attempt // 40)
        centre = rng.uniform(lo, hi)
        if not _in_lung(grid, mask, centre, lung.label):
            continue
        lesion = Lesion(tuple(centre), r, axes, tuple(r * stretch), lobes, value, lung.label)
        box, rho = _lesion_rho(grid, lesion, margin)
        inside = rho < 1 + margin / min(lesion.scales)
        if inside.any() and np.all(mask[box][inside] == lung.label):
            return lesion
    raise RuntimeError("could not place a lesion inside the lung")


def paint_lesion(grid: Grid, image: np.ndarray, lesion: Lesion) -> None:
    """Paint the lesion with a partial-volume edge (in place)."""
    box, rho = _lesion_rho(grid, lesion, max(grid.spacing[:2]))
    edge = max(grid.spacing[:2]) / lesion.radius
    alpha = np.clip((1 - rho) / edge + 0.5, 0.0, 1.0)
    sub = image[box]
    sub += (np.float32(lesion.value) - sub) * alpha
