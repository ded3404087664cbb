"""The phantom's voxel grid and its shape primitives, in body-centred millimetres.

The grid is the canonical RAS index grid: index i runs toward the patient's Right (+x), j toward
Anterior (+y) and k toward Superior (+z). Local coordinates put the body axis at x = y = 0 and the
first slice at z = 0. Every primitive works inside the bounding box of its shape only, so its cost
follows the size of the shape, not of the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Box", "Grid", "segment_distance", "superellipse"]

Box = tuple[slice, slice, slice]
Point = Sequence[float]


@dataclass
class Grid:
    """A regular axis-aligned grid: voxel (i, j, k) sits at ``origin + spacing * (i, j, k)`` (local mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    axes: tuple[np.ndarray, np.ndarray, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.axes = tuple(  # type: ignore[assignment]
            (o + s * np.arange(n)).astype(np.float32)
            for o, s, n in zip(self.origin, self.spacing, self.shape, strict=True)
        )

    def box(self, lo: Point, hi: Point) -> Box:
        """Index slices of the voxels whose centres lie in the local mm box [lo, hi] (may be empty)."""
        out = []
        for o, s, n, a, b in zip(self.origin, self.spacing, self.shape, lo, hi, strict=True):
            i0 = min(n, max(0, int(np.ceil((a - o) / s))))
            i1 = min(n, max(0, int(np.floor((b - o) / s)) + 1))
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)  # type: ignore[return-value]

    def around(self, centre: Point, half: float | Point) -> tuple[Box, tuple[np.ndarray, ...]]:
        """The box of half-size ``half`` mm around ``centre`` and the voxel offsets from the centre,
        as broadcastable (n, 1, 1), (1, m, 1), (1, 1, l) float32 arrays."""
        half = np.broadcast_to(np.asarray(half, dtype=float), (3,))
        c = np.asarray(centre, dtype=float)
        box = self.box(c - half, c + half)
        return box, self.offsets(box, c)

    def offsets(self, box: Box, centre: Point = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, ...]:
        """Broadcastable local mm coordinates of a box's voxels relative to ``centre``."""
        out = []
        for axis, (ax, sl, c) in enumerate(zip(self.axes, box, centre, strict=True)):
            shape = [1, 1, 1]
            shape[axis] = -1
            out.append((ax[sl] - np.float32(c)).reshape(shape))
        return tuple(out)

    def index(self, point: Point) -> tuple[int, int, int] | None:
        """The nearest voxel to a local mm point, or None outside the grid."""
        ijk = np.rint((np.asarray(point) - self.origin) / self.spacing).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= self.shape):
            return None
        return tuple(int(v) for v in ijk)  # type: ignore[return-value]


def superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float = 2.0) -> np.ndarray:
    """Normalised radius ``(|x/a|^p + |y/b|^p)^(1/p)``: below 1 inside the (super)ellipse."""
    return (np.abs(x / np.float32(a)) ** p + np.abs(y / np.float32(b)) ** p) ** (1.0 / p)


def segment_distance(grid: Grid, p0: Point, p1: Point, pad: float) -> tuple[Box, np.ndarray, np.ndarray]:
    """Distance (mm) of each voxel near the segment p0-p1 to it, and its position t in [0, 1] along it.

    The box is the segment's bounding box grown by ``pad`` mm on every side.
    """
    a, b = np.asarray(p0, dtype=float), np.asarray(p1, dtype=float)
    box = grid.box(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
    dx, dy, dz = grid.offsets(box, a)
    d = (b - a).astype(np.float32)
    t = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    dist = np.sqrt((dx - t * d[0]) ** 2 + (dy - t * d[1]) ** 2 + (dz - t * d[2]) ** 2)
    return box, dist, t
