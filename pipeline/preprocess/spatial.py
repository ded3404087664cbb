"""Reorientation, resampling and crop/pad in one SimpleITK resample.

Instead of reorienting, resampling the whole scan and then cropping (three passes over ~80M voxels
for a 512x512x300 CT), ``plan_grid`` works out the final RAS grid first: the foreground bounding box
is found on a strided sample of the input, mapped to world space, and the output grid is placed over
it at the target spacing ("pad": the target shape at the target spacing, centred on the box) or
scaled to fit ("resize": the box fitted inside the target shape, aspect ratio kept). ``resample``
then interpolates only the output voxels. An oblique input is handled by the same resample.

Example:
    >>> grid = plan_grid(vol, cfg.preprocess, threshold=-500.0)    # doctest: +SKIP
    >>> cube = resample(vol.image, grid, linear=True, fill=-1024.0)  # (X, Y, Z) RAS array
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.config import PreprocessConfig
from pipeline.io import LPS_TO_RAS, Volume
from pipeline.sitk_buffer import array_view

__all__ = ["Grid", "foreground_box", "plan_grid", "resample"]

# Voxels sampled at most when looking for the foreground bounding box.
SAMPLE_VOXELS = 2_000_000


@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS output grid: voxel (i, j, k) sits at ``origin + spacing * (i, j, k)``."""

    origin: np.ndarray  # RAS mm of voxel (0, 0, 0)
    spacing: np.ndarray
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = self.origin
        return affine


def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners of an index box, as a (4, 8) homogeneous array."""
    pts = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
    return np.vstack([pts, np.ones(pts.shape[1])])


def _edge_plane(array: np.ndarray, axis: int, threshold: float, planes: range) -> int:
    """The first of ``planes`` (index along ``axis``) holding a voxel above ``threshold``; the
    last plane of the range is known to hold one."""
    return next(k for k in planes if (np.take(array, k, axis=axis) > threshold).any())


def foreground_box(volume: Volume, threshold: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """World (RAS mm) bounds of the voxels above ``threshold``, and the foreground fraction.

    With ``threshold=None`` the whole volume is the box. The search runs on a strided sample, then
    each bound is refined on the full-resolution planes between it and the next sampled plane out,
    so the box does not depend on the direction in which the volume is stored (a structure that
    the sample misses entirely, thinner than the stride in every axis, can still be left out).
    On an oblique grid the world box of that index box's corners is wider than its content (a
    rotated box's bounding box), so it is narrowed to the sampled voxels' own world extent, each
    widened by a stride: within a stride of exact, and never cutting a sampled voxel.
    """
    shape = np.array(volume.shape)
    lo, hi, fraction = np.zeros(3), shape - 1.0, 1.0
    fg = None
    if threshold is not None:
        step = max(1, int(np.ceil((np.prod(shape) / SAMPLE_VOXELS) ** (1 / 3))))
        array = volume.array
        fg = array[::step, ::step, ::step] > threshold
        fraction = float(fg.mean())
        if fraction > 0:
            for axis in range(3):
                hits = np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != axis))) * step
                first, last = int(hits[0]), int(hits[-1])
                lo[axis] = _edge_plane(array, axis, threshold, range(max(0, first - step + 1), first + 1))
                outer = min(int(shape[axis]) - 1, last + step - 1)
                hi[axis] = _edge_plane(array, axis, threshold, range(outer, last - 1, -1))
    lo, hi = lo - 0.5, hi + 0.5  # voxel edges, not centres
    affine = volume.affine
    world = (affine @ _corners(lo, hi))[:3]
    box_lo, box_hi = world.min(axis=1), world.max(axis=1)
    if fg is not None and fraction > 0 and _oblique(affine):
        points = affine[:3, :3] @ (np.argwhere(fg).T * step) + affine[:3, 3:]
        reach = (step - 0.5) * np.abs(affine[:3, :3]).sum(axis=1)  # an unsampled voxel's edge
        box_lo = np.maximum(box_lo, points.min(axis=1) - reach)
        box_hi = np.minimum(box_hi, points.max(axis=1) + reach)
    return box_lo, box_hi, fraction


def _oblique(affine: np.ndarray, tolerance: float = 1e-4) -> bool:
    """Whether some voxel axis of ``affine`` is not along a world axis."""
    axes = np.abs(affine[:3, :3]) / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.any(axes.max(axis=0) < 1 - tolerance))


def plan_grid(volume: Volume, cfg: PreprocessConfig, threshold: float | None) -> Grid:
    """The RAS output grid for a volume under the preprocessing config (see the module docstring)."""
    lo, hi, _ = foreground_box(volume, threshold if cfg.crop_foreground else None)
    lo, hi = lo - cfg.margin_mm, hi + cfg.margin_mm
    native = np.asarray(volume.spacing, dtype=float)
    target = np.asarray(cfg.spacing if cfg.spacing is not None else [native.min()] * 3, dtype=float)
    shape = np.array(cfg.shape)
    # A one-voxel-thick input (a 2D slice) stays one voxel thick along the world axis it lies across.
    flat = {int(np.argmax(np.abs(volume.affine[:3, a]))): native[a] for a in range(3) if volume.shape[a] == 1}
    for axis, thickness in flat.items():
        shape[axis], target[axis] = 1, thickness
    extent = hi - lo
    if cfg.fit == "resize":
        free = [a for a in range(3) if a not in flat]
        scale = max(float(np.max(extent[free] / (shape[free] * target[free]))), 1e-6)
        target[free] = target[free] * scale
    center = (lo + hi) / 2
    origin = center - target * (shape - 1) / 2
    return Grid(origin, target, tuple(int(s) for s in shape))  # type: ignore[arg-type]


def resample(image: sitk.Image, grid: Grid, *, linear: bool, fill: float) -> np.ndarray:
    """Interpolate ``image`` onto ``grid``; return a read-only (X, Y, Z) array in RAS index order."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputOrigin((LPS_TO_RAS @ grid.origin).tolist())
    resampler.SetOutputSpacing(grid.spacing.tolist())
    resampler.SetSize(list(grid.shape))
    resampler.SetOutputDirection(LPS_TO_RAS.flatten().tolist())  # RAS axes written in LPS terms
    resampler.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(fill)
    resampler.SetOutputPixelType(sitk.sitkFloat32 if linear else image.GetPixelID())
    return array_view(resampler.Execute(image))
