"""Intensity normalisation (CT window, MR percentile clip + z-score, min-max, or none), then an
optional Gaussian smoothing with its sigma in mm.

Example:
    >>> import numpy as np
    >>> normalize(np.array([-2000.0, -1024.0, 600.0, 3000.0]), IntensityConfig(mode="ct"))
    array([0., 0., 1., 1.], dtype=float32)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.config import IntensityConfig

__all__ = [
    "DISTANCE_SCALE_MM",
    "background_value",
    "foreground_threshold",
    "normalize",
    "smooth",
    "surface_distance",
]

# Air/body boundary in HU: well above air (-1000) and lung (-850), below fat (-100).
CT_BODY_HU = -500.0
# What a CT scanner writes for air (and many for the padding outside the field of view).
CT_AIR_HU = -1024.0
# Distances to a shape's surface are divided by this, so a gland's limb (a few mm thick) maps to
# about 0.1-1, the range of the image channels.
DISTANCE_SCALE_MM = 10.0


def foreground_threshold(cfg: IntensityConfig, configured: float | None, array: np.ndarray) -> float:
    """The value above which a voxel is foreground: the configured one, else -500 HU for CT, else
    anything above the array's minimum (the MONAI CropForeground convention)."""
    if configured is not None:
        return configured
    return CT_BODY_HU if cfg.mode == "ct" else float(array.min())


def background_value(cfg: IntensityConfig, array: np.ndarray) -> float:
    """The raw value used to fill voxels outside the scan: air (or the bottom of a CT window below
    it), which the window maps to 0 like any value under it and which is not foreground at -500 HU
    even under a soft-tissue window; else the minimum."""
    return min(cfg.window[0], CT_AIR_HU) if cfg.mode == "ct" else float(array.min())


def normalize(array: np.ndarray, cfg: IntensityConfig, foreground: np.ndarray | None = None) -> np.ndarray:
    """Map raw intensities to the network's range (float32).

    ct: clip to the window, scale to [0, 1]. mr: clip to the percentiles of the foreground voxels,
    then z-score with their mean and sd. minmax: scale [min, max] to [0, 1]. none: unchanged.
    """
    x = np.asarray(array, dtype=np.float32)
    if cfg.mode == "ct":
        lo, hi = cfg.window
        scaled = np.clip(x, lo, hi)  # the one new array; the rest is done in place
        scaled -= np.float32(lo)
        scaled /= np.float32(hi - lo)  # a division, as before: bit-identical cached views
        return scaled
    if cfg.mode == "mr":
        values = x[foreground] if foreground is not None and foreground.any() else x
        lo, hi = np.percentile(values, cfg.percentiles)
        clipped = np.clip(x, lo, hi)
        ref = clipped[foreground] if foreground is not None and foreground.any() else clipped
        return ((clipped - ref.mean()) / max(float(ref.std()), 1e-6)).astype(np.float32)
    if cfg.mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / np.float32(max(hi - lo, 1e-6))
    return x


def smooth(image: np.ndarray, sigma_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Gaussian smoothing with a sigma given in mm on a grid of ``spacing`` mm (unchanged if 0)."""
    if sigma_mm <= 0:
        return image
    sigma = [sigma_mm / float(s) for s in spacing]
    return ndimage.gaussian_filter(image, sigma, mode="nearest").astype(np.float32, copy=False)


def surface_distance(foreground: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Each foreground voxel's distance to the shape's surface in units of ``DISTANCE_SCALE_MM``.

    The Euclidean distance (in mm, on a grid of ``spacing`` mm) from the voxel centre to the nearest
    background voxel centre, less half a voxel along the main axis of that step, so that it measures
    to the boundary between them; 0 outside the shape. Its maximum over a structure is half the
    structure's thickness, on an anisotropic grid too.

    Example:
        >>> slab = np.zeros((1, 1, 9), bool); slab[..., 2:7] = True   # 5 voxels of 2 mm thick
        >>> (surface_distance(slab, np.array([2.0, 2.0, 2.0])) * DISTANCE_SCALE_MM)[0, 0, 2:7]
        array([1., 3., 5., 3., 1.], dtype=float32)
    """
    sampling = np.asarray(spacing, dtype=float)
    if np.allclose(sampling, sampling[0]):
        distance = ndimage.distance_transform_edt(foreground, sampling=sampling.tolist())
        half_voxel: float | np.ndarray = 0.5 * float(sampling[0])
    else:  # the half voxel depends on the direction of the nearest background voxel
        distance, nearest = ndimage.distance_transform_edt(
            foreground, sampling=sampling.tolist(), return_indices=True
        )
        step = np.abs(nearest - np.indices(foreground.shape)) * sampling[:, None, None, None]
        half_voxel = 0.5 * sampling[np.argmax(step, axis=0)]
    return (np.clip(distance - half_voxel, 0, None) / DISTANCE_SCALE_MM).astype(np.float32)
