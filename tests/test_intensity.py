"""Intensity smoothing: the sigma is in mm on anisotropic grids, and the stage applies it to the volume."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.config import load_config
from pipeline.preprocess.cache import load_entry
from pipeline.preprocess.intensity import smooth
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
