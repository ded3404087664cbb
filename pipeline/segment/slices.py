"""Axial-slice preprocessing shared by lung-segmentation training and inference, and its inverse.

A scan is first viewed in the canonical orientation (L, P, S) with ``to_canonical``: voxel axis 0 runs
towards the patient's left, axis 1 towards posterior and axis 2 towards superior. This is the
radiological display order of a 2D CT slice (and of the kmader_lung2d files), so every slice the net
sees has the same handedness; the view is a flip/transpose of the input array, never a resampling.
``from_canonical`` maps a canonical array back onto the input's own voxel grid.

A stack of axial slices (S, H, W) in HU is then prepared slice by slice:

1. clip to the HU window ([-1024, 600] by default), so the padding outside the field of view (which
   scanners store as -2000, -3024, ...) becomes air;
2. body mask: threshold soft tissue, keep the largest 2D component, fill its holes (the lungs are
   holes of the body), dilate a little; found on a grid of at most ``body_grid`` pixels a side;
3. everything outside the body becomes air (this removes the table, the varying air level and the
   field-of-view padding);
4. a box around the body (plus a margin), square in millimetres, is cut out, padded with air where
   it leaves the image, and resized to ``size``² (bilinear, antialiased): the anatomy's aspect ratio
   is kept, also for non-square pixels (``pixel_mm``, e.g. a coronal acquisition's axial slices);
5. scaled to [0, 1].

``restore_slices`` resizes the net's per-slice scores from ``size``² back into each slice's box on
the original grid and thresholds them.

Example:
    >>> import numpy as np
    >>> params = SliceParams(size=64)
    >>> stack = np.full((1, 100, 120), -1000.0); stack[0, 20:80, 10:110] = 40.0
    >>> prepared = prepare_slices(stack, params)
    >>> prepared.images.shape, float(prepared.images.max()) <= 1.0
    (torch.Size([1, 1, 64, 64]), True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "CANONICAL",
    "PreparedSlices",
    "SliceParams",
    "body_mask",
    "canonical_spacing",
    "crop_resize",
    "from_canonical",
    "prepare_slices",
    "restore_slices",
    "to_canonical",
]

CANONICAL = ("L", "P", "S")
PLANE = np.zeros((3, 3, 3), dtype=bool)
PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity within a slice of an (S, H, W) stack


@dataclass(frozen=True)
class SliceParams:
    """Preprocessing parameters; stored in the checkpoint sidecar so inference matches training."""

    size: int = 256
    window: tuple[float, float] = (-1024.0, 600.0)
    body_threshold: float = -500.0
    margin: float = 0.04  # fraction of the box side added on every side of the body
    body_grid: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SliceParams:
        return cls(**{**data, "window": tuple(data["window"])})


@dataclass
class PreparedSlices:
    """Net inputs (S, 1, size, size), each slice's box (row, col, rows, cols) and the body mask (S, H, W)."""

    images: torch.Tensor
    boxes: np.ndarray
    body: np.ndarray


def _ornt(affine: np.ndarray) -> np.ndarray:
    return nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(CANONICAL)
    )


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An (i, j, k) array as a view in (L, P, S) orientation (flips and transposes only)."""
    return nib.orientations.apply_orientation(array, _ornt(affine))


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel sizes (mm) along the canonical (L, P, S) axes of ``to_canonical``'s view."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of ``to_canonical``: a canonical array back on the grid whose affine is ``affine``."""
    current = nib.orientations.io_orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(CANONICAL), current)
    return nib.orientations.apply_orientation(array, back)


def body_mask(stack: np.ndarray, threshold: float = -500.0, grid: int = 128) -> tuple[np.ndarray, int]:
    """The body of each slice of an (S, H, W) HU stack, on a grid subsampled by the returned factor.

    Per slice: voxels above ``threshold``, the largest 2D component, holes filled, dilated by one.
    """
    step = max(1, int(np.ceil(max(stack.shape[1:]) / grid)))
    tissue = stack[:, ::step, ::step] > threshold
    labels, n = ndimage.label(tissue, structure=PLANE)
    if n == 0:
        return tissue, step
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    # labels are numbered in raster order, so a slice's labels follow those of the slice before
    highest = np.maximum.accumulate(labels.reshape(len(labels), -1).max(axis=1))
    slice_of = np.searchsorted(highest, np.arange(n + 1))
    slice_of[0] = -1  # the background sorts first and is dropped
    order = np.lexsort((sizes, slice_of))[1:]  # by slice, then size
    last_of_slice = np.r_[slice_of[order][1:] != slice_of[order][:-1], True]
    keep = np.zeros(n + 1, dtype=bool)
    keep[order[last_of_slice]] = True
    body = ndimage.binary_fill_holes(keep[labels], structure=PLANE)
    return ndimage.binary_dilation(body, structure=PLANE), step


def _boxes(
    body: np.ndarray, step: int, shape: tuple[int, int], margin: float, aspect: float = 1.0
) -> np.ndarray:
    """Boxes (row, col, rows, cols) around each slice's body, in full-resolution pixels, square in
    millimetres: ``aspect`` is a column's width over a row's height (1 for square pixels)."""
    boxes = np.zeros((len(body), 4), dtype=np.int64)
    rows, cols = body.any(axis=2), body.any(axis=1)
    for s in range(len(body)):
        r, c = np.flatnonzero(rows[s]), np.flatnonzero(cols[s])
        if r.size == 0:
            r0, r1, c0, c1, grow = 0, shape[0], 0, shape[1], 1.0
        else:
            r0, r1 = r[0] * step, min((r[-1] + 1) * step, shape[0])
            c0, c1 = c[0] * step, min((c[-1] + 1) * step, shape[1])
            grow = 1 + 2 * margin
        side = max(r1 - r0, (c1 - c0) * aspect) * grow  # in row pixels
        height, width = int(np.ceil(side)), int(np.ceil(side / aspect))
        boxes[s] = ((r0 + r1 - height) // 2, (c0 + c1 - width) // 2, height, width)
    return boxes


def crop_resize(
    stack: np.ndarray,
    boxes: np.ndarray,
    size: int,
    fill: float,
    mode: str = "bilinear",
    window: tuple[float, float] | None = None,
    body: np.ndarray | None = None,
) -> torch.Tensor:
    """Cut each slice's box (row, col, rows, cols), padding with ``fill`` outside the slice; resize
    it to ``size``².

    ``mode`` is a ``torch.nn.functional.interpolate`` mode: bilinear (antialiased) for images,
    nearest-exact for label masks. Optionally values are clipped to ``window`` and pixels outside
    ``body`` (S, H, W) set to ``fill`` first; done per slice, inside the box only, to stay cache-warm.
    """
    out = torch.empty((len(stack), 1, size, size), dtype=torch.float32)
    height, width = stack.shape[1:]
    for s, (r0, c0, rows, cols) in enumerate(boxes):
        crop = np.full((rows, cols), fill, dtype=np.float32)
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + rows, height), min(c0 + cols, width)
        part = stack[s, rs:re, cs:ce].astype(np.float32)
        if window is not None:
            np.clip(part, *window, out=part)
        if body is not None:
            part[~body[s, rs:re, cs:ce]] = fill
        crop[rs - r0 : re - r0, cs - c0 : ce - c0] = part
        tensor = torch.from_numpy(crop)[None, None]
        if mode == "bilinear":
            out[s] = F.interpolate(tensor, (size, size), mode=mode, align_corners=False, antialias=True)[0]
        else:
            out[s] = F.interpolate(tensor, (size, size), mode=mode)[0]
    return out


def prepare_slices(
    stack: np.ndarray, params: SliceParams, pixel_mm: tuple[float, float] = (1.0, 1.0)
) -> PreparedSlices:
    """Net inputs for an (S, H, W) stack of HU slices; see the module docstring for the steps.

    ``pixel_mm`` is the (H, W) pixel spacing; the boxes are square in millimetres.
    """
    lo, hi = params.window
    small, step = body_mask(stack, params.body_threshold, params.body_grid)
    height, width = stack.shape[1:]
    body = np.repeat(np.repeat(small, step, axis=1), step, axis=2)[:, :height, :width]
    boxes = _boxes(small, step, (height, width), params.margin, pixel_mm[1] / pixel_mm[0])
    images = crop_resize(stack, boxes, params.size, lo, window=params.window, body=body)
    images.sub_(lo).div_(hi - lo)
    return PreparedSlices(images, boxes, body)


def restore_slices(
    scores: torch.Tensor, boxes: np.ndarray, shape: tuple[int, int], threshold: float = 0.0
) -> np.ndarray:
    """Map (S, 1, size, size) scores back onto the original (S, H, W) slice grid: score > threshold.

    Each slice's scores are resized bilinearly to its box; pixels outside the box are background.
    """
    height, width = shape
    out = np.zeros((len(scores), height, width), dtype=bool)
    for s, (r0, c0, rows, cols) in enumerate(boxes):
        up = F.interpolate(
            scores[s : s + 1].float(), (int(rows), int(cols)), mode="bilinear", align_corners=False
        )[0, 0]
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + rows, height), min(c0 + cols, width)
        out[s, rs:re, cs:ce] = (up[rs - r0 : re - r0, cs - c0 : ce - c0] > threshold).numpy()
    return out
