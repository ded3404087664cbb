"""Post-processing of a predicted lung mask, and lung volumes in millilitres.

``postprocess`` works on the input's (i, j, k) grid and uses its affine only to find the axial slices
and the patient's left/right (via the canonical (L, P, S) view of ``slices.to_canonical``, which is a
flip/transpose, never a resampling). Steps:

1. drop every voxel outside the body mask (spurious blobs in the air, the table, the arms' air);
2. fill holes slice by slice (vessels and nodules the net missed), but only holes smaller than
   ``max_hole_mm2`` so the mediastinum between two touching lungs is never filled;
3. with the scan's HU values given, drop every 3D component that is not mostly aerated (fewer than
   ``min_aerated`` of its voxels below ``AERATED_HU``): the net's typical gross error on scans it
   finds unfamiliar (a body cut by the field of view, an unusual rotation) is a blob of chest-wall
   soft tissue, which no lung is;
4. keep the ``keep`` largest 3D components (SimpleITK, multithreaded), all on the lungs' bounding box;
5. optionally label the right lung 1 and the left lung 2: a component lying mostly on one side of
   the body's midline gets that side; one that straddles it (lungs fused at a junction line) is
   split along the midline.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((40, 30, 5), np.uint8); mask[5:15, 5:25] = 1; mask[25:35, 5:25] = 1
    >>> labels = postprocess(mask, np.diag([1.0, 1.0, 2.0, 1.0]))  # RAS+: i runs to the patient's right
    >>> int(labels[30, 10, 2]), int(labels[10, 10, 2])                # right lung 1, left lung 2
    (1, 2)
    >>> lung_volumes(labels, np.diag([1.0, 1.0, 2.0, 1.0]))["total_ml"]
    4.0
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline.segment.slices import from_canonical, to_canonical
from pipeline.sitk_buffer import writable_bytes

__all__ = ["LEFT", "RIGHT", "lung_volumes", "postprocess"]

RIGHT, LEFT = 1, 2
# Aerated lung is about -900 to -500 HU; fat, muscle and other soft tissue are above -150 HU.
AERATED_HU = -400.0
STRADDLE = 0.2  # a component with more than this fraction on each side of the midline is split


def _canonical_stack(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(S, L, P) view of an (i, j, k) array: axial slices first."""
    return to_canonical(array, affine).transpose(2, 0, 1)


def _pixel_area(affine: np.ndarray) -> float:
    """In-plane pixel area (mm²) of the canonical axial slices."""
    ornt = nib.orientations.io_orientation(affine)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(affine)
    return float(spacing[0] * spacing[1])


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of an (S, H, W) mask as slices, or None if it is empty.

    Reduces over the slices that hit first (cheap contiguous passes), then over one (H, W) plane.
    """
    hit = np.flatnonzero(mask.any(axis=(1, 2)))
    if hit.size == 0:
        return None
    first, last = int(hit[0]), int(hit[-1]) + 1
    plane = np.logical_or.reduce(mask[first:last], axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return slice(first, last), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


# Label arrays are read in chunks of this many voxels: numpy's bincount and take copy their indices
# as int64, which for a whole scan's uint32 labels would be a fresh 400 MB.
CHUNK = 1 << 22


def _components(mask_image: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """Face-connected components of a binary image, and each label's voxel count (label 0 first)."""
    labeller = sitk.ConnectedComponentImageFilter()
    labels = labeller.Execute(mask_image)
    flat = sitk.GetArrayViewFromImage(labels).reshape(-1)
    sizes = np.zeros(labeller.GetObjectCount() + 1, np.int64)
    for start in range(0, flat.size, CHUNK):
        sizes += np.bincount(flat[start : start + CHUNK], minlength=sizes.size)
    return labels, sizes


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``table[labels]`` for a 3D label array, a few slices at a time."""
    out = np.empty(labels.shape, table.dtype)
    step = max(1, CHUNK // max(1, labels[0].size))
    for start in range(0, len(labels), step):
        np.take(table, labels[start : start + step], out=out[start : start + step])
    return out


def _fill_small_holes(mask: np.ndarray, max_pixels: float, slab: int = 16) -> np.ndarray:
    """Fill 2D holes (background not reaching a slice's edge) of at most ``max_pixels`` pixels.

    The slices of each slab of ``slab`` slices are laid out as one tall 2D image, each preceded by a
    background row and flanked by background columns, so all background that reaches any slice edge
    is one component; the others are the holes. One multithreaded SimpleITK labelling does a slab at
    once; the tall image is written straight into SimpleITK's buffer and its labels are read in
    place. Slabs keep the uint32 labels small: a whole 512×512×300 scan's would be a fresh 200 MB,
    about a second on a VM whose new memory pages are slow to touch.
    """
    out = mask.copy()
    for first in range(0, len(mask), slab):
        part = mask[first : first + slab]
        n, height, width = part.shape
        tall = sitk.Image([width + 2, n * (height + 1) + 1], sitk.sitkUInt8)
        background = writable_bytes(tall)
        background.fill(1)
        rows = background[: n * (height + 1) * (width + 2)].reshape(n, height + 1, width + 2)
        np.logical_not(part, out=rows[:, 1:, 1:-1].view(bool))
        labels, sizes = _components(tall)
        sizes[0] = 0  # label 0 is the lungs themselves
        is_hole = (sizes <= max_pixels) & (sizes > 0)
        is_hole[int(np.argmax(sizes))] = False  # the largest, reaching every slice's edge, is outside
        view = sitk.GetArrayViewFromImage(labels)[:-1].reshape(n, height + 1, width + 2)
        out[first : first + n] |= _lookup(is_hole, view[:, 1:, 1:-1])
    return out


def _largest_components(
    mask: np.ndarray, keep: int, image: np.ndarray | None = None, min_aerated: float = 0.0
) -> np.ndarray:
    """Labels 1..keep of the ``keep`` largest 3D components (face connectivity), largest first.

    With ``image`` (HU, shaped like ``mask``), a component is a candidate only if at least
    ``min_aerated`` of its voxels are below ``AERATED_HU``, estimated on every second voxel along
    each axis (components too small to be sampled count as aerated; they are never the largest).
    """
    components, sizes = _components(sitk.GetImageFromArray(mask.view(np.uint8)))
    labels = sitk.GetArrayViewFromImage(components)  # read in place, as in _fill_small_holes
    candidates = np.argsort(-sizes[1:], kind="stable") + 1  # largest first
    if image is not None and min_aerated > 0 and candidates.size:
        sample = labels[::2, ::2, ::2]
        total = np.bincount(sample.ravel(), minlength=sizes.size)
        aerated = np.bincount(sample[image[::2, ::2, ::2] < AERATED_HU], minlength=sizes.size)
        candidates = candidates[aerated[candidates] >= min_aerated * total[candidates]]
    lookup = np.zeros(sizes.size, dtype=np.uint8)
    lookup[candidates[:keep]] = np.arange(1, min(keep, candidates.size) + 1)
    return _lookup(lookup, labels)


def _sides(labels: np.ndarray, midline: float, keep: int) -> np.ndarray:
    """Right lung 1, left lung 2 in an (S, L, P) crop whose axis 1 runs towards the patient's left."""
    out = np.zeros_like(labels)
    right_half = np.arange(labels.shape[1]) < midline
    for label in range(1, keep + 1):
        component = labels == label
        per_column = component.sum(axis=(0, 2))
        total = per_column.sum()
        if total == 0:
            continue
        right = per_column[right_half].sum() / total
        if right >= 1 - STRADDLE:
            out[component] = RIGHT
        elif right <= STRADDLE:
            out[component] = LEFT
        else:
            out[component] = LEFT
            out[component & right_half[None, :, None]] = RIGHT
    return out


def postprocess(
    mask: np.ndarray,
    affine: np.ndarray,
    body: np.ndarray | None = None,
    *,
    image: np.ndarray | None = None,
    keep: int = 2,
    max_hole_mm2: float = 2000.0,
    min_aerated: float = 0.5,
    label_sides: bool = True,
) -> np.ndarray:
    """Clean a binary (i, j, k) lung mask; return uint8 labels on the same grid (see module doc).

    ``body`` is a boolean (i, j, k) body mask; without it nothing is removed as outside the body and
    the midline is the middle of the lungs' bounding box. ``image`` is the scan in HU on the same
    grid; without it no component is dropped as not aerated. With ``label_sides=False`` lungs are 1.
    """
    mask = np.asarray(mask)
    stack = _canonical_stack(mask if mask.dtype == bool else mask > 0, affine)
    body_stack = None if body is None else _canonical_stack(np.asarray(body, dtype=bool), affine)
    out = np.zeros(stack.shape, dtype=np.uint8)
    box = _bbox(stack)
    if box is not None:
        crop = np.ascontiguousarray(stack[box])
        if body_stack is not None:
            crop &= body_stack[box]
        crop = _fill_small_holes(crop, max_hole_mm2 / _pixel_area(affine))
        hu = None if image is None else _canonical_stack(np.asarray(image), affine)[box]
        labels = _largest_components(crop, keep, hu, min_aerated)
        if label_sides:
            if body_stack is not None:
                per_column = body_stack.sum(axis=(0, 2), dtype=np.int64)
                midline = float(per_column @ np.arange(len(per_column)) / max(per_column.sum(), 1))
            else:
                midline = (box[1].start + box[1].stop) / 2
            labels = _sides(labels, midline - box[1].start, keep)
        else:
            labels = (labels > 0).astype(np.uint8)
        out[box] = labels
    return from_canonical(out.transpose(1, 2, 0), affine)


def lung_volumes(labels: np.ndarray, affine: np.ndarray, sides: bool = True) -> dict[str, float]:
    """Lung volumes in mL: voxel count × voxel volume. Right/left are NaN when ``sides`` is False."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    labels = np.asarray(labels)
    right, left = (float(np.count_nonzero(labels == side)) * voxel_ml for side in (RIGHT, LEFT))
    total = float(np.count_nonzero(labels)) * voxel_ml
    if not sides:
        right = left = float("nan")
    return {"right_ml": right, "left_ml": left, "total_ml": total}
