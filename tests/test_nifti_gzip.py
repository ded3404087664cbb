"""The ISA-L .nii.gz fast path gives exactly the image SimpleITK's reader gives, or steps aside."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.io import read_header, read_volume, save_nifti
from pipeline.nifti_gzip import read_plain_nifti_gz

ORIENTATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "orientation_testdata"


def _oblique_affine() -> np.ndarray:
    """An LPS-like affine turned 10 degrees about the S axis, spacing (0.9, 0.8, 2.5) mm."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1]]) @ np.diag([0.9, 0.8, 2.5])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return affine


OBLIQUE = _oblique_affine()


def assert_same_as_sitk(path: Path, **read_args) -> None:
    image = read_volume(path, **read_args).image
    reference = sitk.ReadImage(str(path))
    assert image.GetPixelID() == reference.GetPixelID()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetDirection() == reference.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32", "float32", "float64"])
def test_fast_path_matches_simpleitk(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 300, (23, 17, 9))).astype(dtype)
    path = save_nifti(tmp_path / f"{dtype}.nii.gz", array, OBLIQUE)
    assert read_plain_nifti_gz(path, read_header(path).pixel_type) is not None  # the fast path ran
    assert_same_as_sitk(path)


def test_fast_path_steps_aside_for_scaled_and_big_endian_files(tmp_path: Path) -> None:
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    scaled = nib.Nifti1Image(array, OBLIQUE)
    scaled.header.set_slope_inter(0.5, -3.0)  # ITK rescales to float
    big = nib.Nifti1Image(array, OBLIQUE, header=nib.Nifti1Header(endianness=">"))
    for name, image in (("scaled", scaled), ("big_endian", big)):
        path = tmp_path / f"{name}.nii.gz"
        path.write_bytes(gzip.compress(image.to_bytes()))
        assert read_plain_nifti_gz(path, read_header(path).pixel_type) is None, name
        assert_same_as_sitk(path)


@pytest.mark.realdata
@pytest.mark.skipif(not ORIENTATION.is_dir(), reason="shared data not present")
def test_fast_path_matches_simpleitk_on_real_files() -> None:
    files = [p for p in sorted(ORIENTATION.rglob("*.nii.gz")) if len(nib.load(p).shape) == 3]
    assert len(files) >= 4
    for path in files:
        assert_same_as_sitk(path, nonfinite="zero")  # ITK's reader zeroes NaN; so does nonfinite=zero
