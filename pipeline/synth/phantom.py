"""One synthetic chest CT case: anatomy, acquisition (grid, noise, orientation, obliquity), geometry.

A case is built in a canonical RAS index grid (see ``anatomy`` for the anatomy model and ``lung``
for vessels and lesions), given noise and a slight in-plane blur, converted to int16 HU, and then its
array axes are flipped/permuted to the case's orientation code with the affine adjusted so that
every structure keeps its world (RAS+ mm) position. About a quarter of the cases get an oblique
affine: a 5-15 degree rotation about one or two axes, about the body centre; the array is unchanged.

The body axis sits at world x = 0 (before any oblique rotation), so the right lung lies at x > 0.

Each case draws from independent random streams (acquisition, anatomy, vessels, lesion, noise), so
``positive`` only adds the lesion and ``size``, ``depth``, ``orientation`` and ``oblique`` change
nothing but what they name: the same seed gives the same patient.

Example:
    >>> case = generate_case(7, positive=True, size=64)
    >>> case.image.dtype, case.mask.dtype, case.label
    (dtype('int16'), dtype('uint8'), 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_
from scipy import ndimage

from pipeline.synth.anatomy import paint_anatomy, sample_anatomy
from pipeline.synth.lung import paint_lesion, paint_vessels, place_lesion
from pipeline.synth.shapes import Grid

__all__ = ["ORIENTATIONS", "Acquisition", "PhantomCase", "generate_case"]

ORIENTATIONS = ("RAS", "LPS", "LAS")
OBLIQUE_FRACTION = 0.25
HU_RANGE = (-1024, 3071)
NOISE_CHUNK = 32  # slices of noise drawn at a time (bounds the memory of a 512-size case)


@dataclass
class PhantomCase:
    """One generated case; ``meta`` holds the acquisition, the lesion and named world landmarks."""

    image: np.ndarray  # int16 HU, (i, j, k) order
    mask: np.ndarray  # uint8: 1 = right lung, 2 = left lung (lesion voxels stay in the lung label)
    affine: np.ndarray  # 4x4 voxel -> RAS+ mm
    label: int  # 1 = visible lung lesion, 0 = normal
    lesion_center_ras: tuple[float, float, float] | None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Acquisition:
    """How a case is scanned (all drawn per case; arguments of ``generate_case`` override some)."""

    size: int  # in-plane voxels
    fov: float  # in-plane field of view, mm
    thickness: float  # slice spacing, mm
    height: float  # scanned chest height, mm
    orientation: str
    oblique: bool
    tilt: tuple[tuple[int, float], ...]  # (axis, degrees) turns of an oblique affine
    noise: float  # Gaussian noise sigma (HU) after the blur
    blur: float  # in-plane Gaussian blur sigma (mm): the scanner's point spread
    offset: tuple[float, float]  # body centre offset from the field centre (x, y), mm
    table: tuple[float, float]  # world (y, z) of the body centre


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    """Draw an acquisition; every draw happens whatever is later overridden."""
    size = int(rng.integers(128, 193))
    fov = rng.uniform(320, 400)
    thickness = float(rng.choice([2.0, 2.5, 3.0]))
    height = rng.uniform(250, 320)
    orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    oblique = bool(rng.random() < OBLIQUE_FRACTION)
    n_axes = int(rng.integers(1, 3))
    axes = rng.choice(3, size=2, replace=False)[:n_axes]
    angles = rng.uniform(5, 15, 2) * rng.choice([-1.0, 1.0], 2)
    return Acquisition(
        size=size,
        fov=fov,
        thickness=thickness,
        height=height,
        orientation=orientation,
        oblique=oblique,
        tilt=tuple((int(a), float(g)) for a, g in zip(axes, angles, strict=False)),
        noise=rng.uniform(10, 40),
        blur=rng.uniform(0.3, 0.7),
        offset=(rng.uniform(-12, 12), rng.uniform(-12, 12)),
        table=(rng.uniform(-30, 30), rng.uniform(-200, 0)),
    )


def _rotation(tilt: tuple[tuple[int, float], ...]) -> np.ndarray:
    """The 3x3 rotation of a sequence of (axis, degrees) turns."""
    rot = np.eye(3)
    for axis, degrees in tilt:
        c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
        a, b = [i for i in range(3) if i != axis]
        turn = np.eye(3)
        turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
        rot = turn @ rot
    return rot


def _add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float, blur: float) -> None:
    """Add Gaussian noise, then blur in-plane by ``blur`` voxels; the final noise sd is ``sigma``."""
    impulse = np.zeros(41)
    impulse[20] = 1.0
    gain = float(np.sum(ndimage.gaussian_filter1d(impulse, blur) ** 2))  # noise sd kept by a 2D blur
    for k0 in range(0, image.shape[2], NOISE_CHUNK):
        slab = image[:, :, k0 : k0 + NOISE_CHUNK]
        noise = rng.standard_normal(slab.shape[::-1], dtype=np.float32).T
        noise *= np.float32(sigma / gain)
        slab += noise
    for k in range(image.shape[2]):  # slice by slice: much faster than a 3D call with sigma_z = 0
        ndimage.gaussian_filter(image[:, :, k], blur, output=image[:, :, k])


def _check_code(code: str) -> str:
    """An upper-case axis code naming each of the three axes once, such as "LPS"."""
    code = code.upper()
    axes = sorted("LRPAIS".index(c) // 2 for c in code if c in "LRPAIS")
    if len(code) != 3 or axes != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} is not an axis code such as RAS, LPS or LAS")
    return code


def _grid(acq: Acquisition, depth: int | None) -> Grid:
    spacing = acq.fov / acq.size
    if depth is None:
        thickness, depth = acq.thickness, round(acq.height / acq.thickness) + 1
    else:
        thickness = acq.height / depth  # the same chest, sampled by the requested number of slices
    start = -(acq.size - 1) / 2 * spacing
    origin = (start - acq.offset[0], start - acq.offset[1], 0.0)
    return Grid((acq.size, acq.size, int(depth)), (spacing, spacing, thickness), origin)


def generate_case(
    seed: int,
    *,
    positive: bool,
    size: int | None = None,
    depth: int | None = None,
    orientation: str | None = None,
    oblique: bool | None = None,
) -> PhantomCase:
    """Generate one case. ``size``/``depth`` force the grid, ``orientation`` an axis code such as
    "LPS", ``oblique`` whether the affine is rotated; None draws each from the case's own stream."""
    if size is not None and size < 48:
        raise ValueError(f"size must be at least 48, got {size}")
    if depth is not None and depth < 16:
        raise ValueError(f"depth must be at least 16, got {depth}")
    acq_rng, anat_rng, vessel_rng, lesion_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    acq = sample_acquisition(acq_rng)
    acq = replace(
        acq,
        size=size or acq.size,
        orientation=_check_code(orientation or acq.orientation),
        oblique=acq.oblique if oblique is None else oblique,
    )
    grid = _grid(acq, depth)
    anatomy = sample_anatomy(anat_rng, acq.fov, acq.height)
    image, mask = paint_anatomy(grid, anatomy)
    paint_vessels(vessel_rng, grid, image, mask, anatomy)
    lesion = place_lesion(lesion_rng, grid, mask, anatomy) if positive else None
    if lesion is not None:
        paint_lesion(grid, image, lesion)
    _add_noise(noise_rng, image, acq.noise, acq.blur / grid.spacing[0])
    np.clip(image, *HU_RANGE, out=image)
    np.rint(image, out=image)
    volume = image.astype(np.int16)

    tilt = acq.tilt if acq.oblique else ()
    rot = _rotation(tilt)
    centre = np.array([0.0, acq.table[0], acq.table[1]])
    shift = centre - np.array([0.0, 0.0, acq.height / 2])  # local mm -> world mm before rotation

    def world(point: Sequence[float]) -> tuple[float, float, float]:
        return tuple(float(v) for v in rot @ (np.asarray(point) + shift - centre) + centre)

    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(grid.spacing)
    affine[:3, 3] = world(grid.origin)
    ornt = ornt_.ornt_transform(ornt_.axcodes2ornt("RAS"), ornt_.axcodes2ornt(tuple(acq.orientation)))
    affine = affine @ ornt_.inv_ornt_aff(ornt, grid.shape)
    oriented = ornt_.apply_orientation(volume, ornt)
    meta = {
        "seed": int(seed),
        "orientation": acq.orientation,
        "oblique": [["xyz"[axis], round(deg, 3)] for axis, deg in tilt],
        "shape": list(oriented.shape),
        "spacing": [round(float(s), 4) for s in nib.affines.voxel_sizes(affine)],
        "noise_sigma": round(acq.noise, 2),
        "blur_mm": round(acq.blur, 3),
        "landmarks_ras": {name: world(p) for name, p in anatomy.landmarks().items()},
        "lesion": None
        if lesion is None
        else {"radius_mm": round(lesion.radius, 2), "lung": "right" if lesion.label == 1 else "left"},
    }
    return PhantomCase(
        image=oriented,
        mask=ornt_.apply_orientation(mask, ornt),
        affine=affine,
        label=int(positive),
        lesion_center_ras=None if lesion is None else world(lesion.centre),
        meta=meta,
    )
