"""Intensity smoothing (sigma in mm on anisotropic grids) and the surface-distance views of a shape."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.config import load_config
from pipeline.preprocess.cache import load_entry
from pipeline.preprocess.intensity import DISTANCE_SCALE_MM, smooth, surface_distance
from pipeline.preprocess.stage import run_preprocess
from pipeline.synth import write_cohort


def test_smooth_sigma_is_in_mm_per_axis():
    impulse = np.zeros((61, 61, 61), dtype=np.float32)
    impulse[30, 30, 30] = 1.0
    spacing = np.array([1.0, 2.0, 0.5])
    out = smooth(impulse, 3.0, spacing)
    assert out.dtype == np.float32 and out.sum() == pytest.approx(1.0, abs=1e-4)
    offsets = np.arange(61) - 30
    for axis, step in enumerate(spacing):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        variance_voxels = float((profile * offsets**2).sum())
        assert variance_voxels == pytest.approx((3.0 / step) ** 2, rel=0.02)


def test_zero_sigma_leaves_the_image_alone():
    image = np.random.default_rng(0).random((5, 5, 5), dtype=np.float32)
    assert smooth(image, 0.0, np.ones(3)) is image


def test_stage_smooths_the_normalised_volume(tmp_path):
    cohort = write_cohort(tmp_path / "cohort", 3, 0.34, size=48, depth=24, seed=5)
    common = {
        "data.manifest": str(cohort),
        "preprocess.shape": [32, 32, 32],
        "preprocess.spacing": [4.0, 4.0, 4.0],
        "preprocess.cache_volume": True,
    }
    plain = run_preprocess(load_config(None, run=tmp_path / "plain", **common))
    soft = run_preprocess(
        load_config(None, run=tmp_path / "soft", **common, **{"preprocess.intensity.smooth_mm": 4.0})
    )
    for entry in sorted((plain / "cache").glob("*.npz")):
        arrays = load_entry(entry)[0]
        before = arrays["volume"].astype(np.float32)
        after = load_entry(soft / "cache" / entry.name)[0]["volume"].astype(np.float32)
        spacing = np.linalg.norm(arrays["affine"][:3, :3], axis=0)  # "resize" fits the grid to the body
        expected = ndimage.gaussian_filter(before, 4.0 / spacing, mode="nearest")
        assert np.abs(after - expected).max() < 2e-3  # float16 storage
        assert np.abs(after - before).max() > 20 * 2e-3  # and visibly so


def test_surface_distance_measures_half_the_thickness_in_mm():
    """A 12 mm thick plate on 1.5 mm voxels: 0 outside, 0.75 mm in its outer voxels, 6 - 0.75 at the core."""
    plate = np.zeros((9, 9, 20), bool)
    plate[..., 4:12] = True  # 8 voxels of 1.5 mm
    spacing = np.array([3.0, 3.0, 1.5])  # coarse in-plane: the plate's faces are along k
    mm = surface_distance(plate, spacing) * DISTANCE_SCALE_MM
    assert mm[~plate].max() == 0
    assert mm[4, 4, 4] == pytest.approx(0.75) and mm[4, 4, 7] == pytest.approx(5.25)
    assert mm[4, 4, 4:12] == pytest.approx(mm[4, 4, 4:12][::-1])


def test_distance_views_follow_the_image_views(tmp_path):
    """views.distance appends a slab of the distance map, cut at the same slices as the image's."""
    ball = np.zeros((15, 15, 15), np.uint8)
    grid = np.indices(ball.shape) - 7
    ball[(grid**2).sum(0) <= 25] = 255
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(ball, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "images" / "b.nii.gz")
    (tmp_path / "manifest.csv").write_text("case_id,image\nb,images/b.nii.gz\n")
    config = load_config(
        None,
        **{
            "run": str(tmp_path / "run"),
            "data.manifest": str(tmp_path / "manifest.csv"),
            "preprocess.spacing": None,
            "preprocess.shape": [15, 15, 15],
            "preprocess.crop_foreground": False,
            "preprocess.intensity.mode": "minmax",
            "preprocess.views.mode": "slab",
            "preprocess.views.thickness": 3,
            "preprocess.views.distance": True,
        },
    )
    views = load_entry(run_preprocess(config) / "cache" / "b.npz")[0]["views"]
    assert views.shape == (3, 6, 15, 15)
    image, distance = views[:, :3], views[:, 3:] * DISTANCE_SCALE_MM
    assert np.array_equal(distance > 0, image > 0.5)  # the same slices, the same voxels
    assert distance[0, 1].max() == pytest.approx(5 * 2.0 - 1.0, abs=0.5)  # radius 5 voxels of 2 mm


def test_surface_distance_takes_half_the_voxel_it_steps_across_on_an_anisotropic_grid():
    """A 10 mm slab across the coarse axis of a 0.5 x 0.5 x 2 mm grid: its core lies 5 mm from
    the surface, its outer voxels 1 mm (half the finest voxel would give 5.75 and 1.75)."""
    slab = np.zeros((12, 12, 9), bool)
    slab[..., 2:7] = True  # 5 voxels of 2 mm, the whole plane
    mm = surface_distance(slab, np.array([0.5, 0.5, 2.0])) * DISTANCE_SCALE_MM
    assert mm[6, 6, 4] == pytest.approx(5.0) and mm[6, 6, 2] == pytest.approx(1.0)


def test_a_soft_tissue_window_does_not_make_the_padding_foreground(tmp_path):
    """The fill outside the scan is air, not the bottom of the window: under [-160, 240] it used to
    count as body (-160 > -500 HU), so the foreground fraction and percentiles described padding."""
    from pipeline.config import PreprocessConfig
    from pipeline.io import read_volume, save_nifti
    from pipeline.preprocess.stage import preprocess_volume

    ct = np.full((20, 20, 20), -1000, np.int16)
    ct[6:14, 6:14, 6:14] = 50
    volume = read_volume(save_nifti(tmp_path / "ct.nii.gz", ct, np.eye(4)))
    fractions = []
    for window in ((-1024.0, 600.0), (-160.0, 240.0)):
        cfg = PreprocessConfig(
            spacing=(1.0, 1.0, 1.0),
            shape=(40, 40, 40),  # the scan's 20^3 padded: seven eighths lie outside it
            fit="pad",
            crop_foreground=False,
            intensity={"mode": "ct", "window": window},
        )
        arrays, stats = preprocess_volume(volume, None, cfg)
        fractions.append(stats["foreground_fraction"])
        assert arrays["views"].min() == 0.0  # the padding still shows as the window's bottom
    assert fractions[1] == pytest.approx(fractions[0], abs=0.002) and fractions[0] < 0.01
