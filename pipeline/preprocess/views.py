"""The three orthogonal views of a RAS volume, in radiological display orientation.

``extract_views`` takes a volume whose array axes point to patient Right, Anterior and Superior
(i, j, k; the preprocessed grid) and returns (3, C, H, W) in the fixed order axial, coronal,
sagittal. Display convention (radiological, as a reading room shows it):

- axial (viewed from the feet): image left = patient right, image top = anterior;
- coronal (viewed from the front): image left = patient right, image top = superior;
- sagittal (viewed from the patient's left): image left = anterior, image top = superior.

Each 2D plane P[a, b] (a = the horizontal anatomical axis, b = the vertical one, both increasing
towards R/A/S) is therefore displayed as ``P[::-1, ::-1].T``. Views of unequal size are padded,
centred, to a common square. A one-slice input (a 2D image) gives the axial view only, (1, C, H, W).

C depends on ``mode``: ``slice`` 1; ``slab`` ``thickness`` adjacent slices; ``mean``/``max`` a
projection over a slab of ``thickness`` slices; ``projections`` 3 channels: the centre slice, and
the mean and max through the whole volume. A slab is centred on the cut where the volume allows and
shifted inwards near an edge, so it always holds ``thickness`` distinct slices; a thickness beyond
the volume takes all of it (a ``slab`` then repeats its edge slices to fill its channels).

Example:
    >>> import numpy as np
    >>> vol = np.zeros((8, 8, 8), np.float32); vol[6, 1, 4] = 1  # right, posterior, mid
    >>> v = extract_views(vol, center=(6, 1, 4))
    >>> v.shape, np.argwhere(v[0, 0] == 1).tolist()              # axial: row 6 (posterior), col 1
    ((3, 1, 8, 8), [[6, 1]])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PROJECTION_CHANNELS", "VIEW_AXES", "center_index", "extract_views", "point_index", "to_display"]

# Per view, the RAS index axis it cuts across. The two axes left, in order, are the plane's
# horizontal and vertical anatomical axes: axial (i, j), coronal (i, k), sagittal (j, k).
VIEW_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
# The channels of mode "projections", in order.
PROJECTION_CHANNELS = ("slice", "mean", "max")


def to_display(plane: np.ndarray) -> np.ndarray:
    """A (..., a, b) plane stack in RAS index order to (..., rows, cols) display order."""
    return np.swapaxes(plane[..., ::-1, ::-1], -1, -2)


def point_index(point: Sequence[float], affine: np.ndarray) -> np.ndarray:
    """The (fractional) voxel index of a world point in RAS mm on the grid of ``affine``."""
    return (np.linalg.inv(affine) @ np.array([*point, 1.0]))[:3]


def center_index(
    shape: Sequence[int],
    *,
    mask: np.ndarray | None = None,
    point: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """The voxel the views pass through: a world point (RAS mm, needs ``affine``), else the mask's
    centroid, else the volume centre. Always clipped into the volume."""
    dims = np.array(shape[:3])
    if point is not None and affine is not None:
        idx = point_index(point, affine)
    elif mask is not None and mask.any():
        idx = np.argwhere(mask > 0).mean(axis=0)
    else:
        idx = (dims - 1) / 2
    # halves round up, whatever the parity (np.rint's half-to-even moved the centre of some sizes)
    return tuple(int(v) for v in np.clip(np.floor(idx + 0.5), 0, dims - 1))  # type: ignore[return-value]


def _channels(volume: np.ndarray, axis: int, at: int, mode: str, thickness: int) -> np.ndarray:
    """The (C, a, b) stack cut across ``axis`` at index ``at``."""
    moved = np.moveaxis(volume, axis, 0)
    depth = moved.shape[0]
    start = min(max(0, at - thickness // 2), max(0, depth - thickness))  # inside the volume
    slab = moved[start : start + thickness]
    if mode == "slice":
        return moved[at : at + 1]
    if mode == "slab":
        return moved[np.clip(np.arange(start, start + thickness), 0, depth - 1)]
    if mode == "mean":
        return slab.mean(axis=0, keepdims=True)
    if mode == "max":
        return slab.max(axis=0, keepdims=True)
    if mode == "projections":
        return np.stack([moved[at], moved.mean(axis=0), moved.max(axis=0)])
    raise ValueError(f"unknown view mode {mode!r}")


def _pad_to(image: np.ndarray, size: int, fill: float) -> np.ndarray:
    """Pad a (C, H, W) stack, centred, to (C, size, size)."""
    ph, pw = size - image.shape[1], size - image.shape[2]
    pad = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    return np.pad(image, pad, constant_values=fill)


def extract_views(
    volume: np.ndarray,
    center: Sequence[int] | None = None,
    mode: str = "slice",
    thickness: int = 1,
    fill: float | None = None,
) -> np.ndarray:
    """(V, C, H, W) views of a RAS (X, Y, Z) volume; see the module docstring for the convention."""
    center = tuple(center) if center is not None else center_index(volume.shape)
    fill = float(volume.min()) if fill is None else fill
    names = ("axial",) if min(volume.shape) == 1 else tuple(VIEW_AXES)
    planes = []
    for name in names:
        axis = VIEW_AXES[name]
        planes.append(to_display(_channels(volume, axis, center[axis], mode, thickness)))
    size = max(max(p.shape[1:]) for p in planes)
    return np.stack([_pad_to(p, size, fill) for p in planes]).astype(volume.dtype, copy=False)
