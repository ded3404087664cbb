"""Geometry: masks round-trip on real awkward headers; views put a marker where the convention says."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.config import PreprocessConfig
from pipeline.io import read_volume, save_nifti, write_like
from pipeline.preprocess.stage import preprocess_volume


def _orientation_cases(shared_data):
    root = shared_data / "orientation_testdata"
    with (root / "manifest.csv").open() as fh:
        return [(row["case_id"], root / row["image"], row["label"]) for row in csv.DictReader(fh)]


@pytest.mark.realdata
def test_mask_round_trip_keeps_the_exact_grid(shared_data, tmp_path):
    """Every real test volume: read, write a mask with write_like, read back: same grid and codes."""
    cases = _orientation_cases(shared_data)
    assert len(cases) == 6
    for case_id, path, _ in cases:
        kwargs = {"volume_index": 1} if case_id == "nib_example4d" else {}
        volume = read_volume(path, nonfinite="zero", **kwargs)
        mask = (volume.array > np.percentile(volume.array, 70)).astype(np.uint8)
        out = write_like(mask, volume, tmp_path / f"{case_id}_mask.nii.gz")
        src, back = nib.load(path), nib.load(out)
        assert back.shape == src.shape[:3], case_id
        np.testing.assert_allclose(back.affine, src.affine, atol=1e-4, err_msg=case_id)
        assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(src.affine), case_id
        for code in ("qform_code", "sform_code"):
            assert int(back.header[code]) == int(src.header[code]), (case_id, code)
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), mask, err_msg=case_id)
        # And through our own reader: the same affine as nibabel's for the source file.
        np.testing.assert_allclose(read_volume(out).affine, src.affine, atol=1e-4, err_msg=case_id)


@pytest.mark.realdata
def test_reader_affine_matches_nibabel_on_oblique_and_flipped_files(shared_data):
    for case_id, path, _ in _orientation_cases(shared_data):
        kwargs = {"volume_index": 0} if case_id == "nib_example4d" else {}
        volume = read_volume(path, nonfinite="zero", **kwargs)
        reference = nib.load(path)
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-4, err_msg=case_id)
        expected = np.asanyarray(reference.dataobj)
        expected = expected[..., 0] if expected.ndim == 4 else expected
        np.testing.assert_allclose(volume.array, np.nan_to_num(expected), err_msg=case_id)


def _phantom_affine(
    kind: str, spacing: tuple[float, float, float], shape: tuple[int, int, int]
) -> np.ndarray:
    """An affine whose volume centre sits at the world origin, in one of three orientations."""
    flips = {"RAS": [1, 1, 1], "LPS": [-1, -1, 1], "oblique": [1, 1, 1]}[kind]
    linear = np.diag(np.array(flips, dtype=float) * spacing)
    if kind == "oblique":
        linear = Rotation.from_euler("zx", [12, 8], degrees=True).as_matrix() @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2)
    return affine


@pytest.mark.parametrize("kind", ["RAS", "LPS", "oblique"])
def test_marker_lands_on_the_documented_pixel_in_each_view(kind, tmp_path):
    """A bright block 12 mm right, 8 mm anterior and 6 mm superior of the centre must show up:
    axial left of and above centre; coronal left of and above; sagittal left of (anterior) and above."""
    shape, spacing = (48, 44, 30), (1.0, 1.25, 2.0)
    affine = _phantom_affine(kind, spacing, shape)
    marker_world = np.array([12.0, 8.0, 6.0])
    array = np.zeros(shape, np.float32)
    idx = np.rint(np.linalg.solve(affine[:3, :3], marker_world - affine[:3, 3])).astype(int)
    array[tuple(slice(i - 1, i + 2) for i in idx)] = 100.0
    path = save_nifti(tmp_path / f"{kind}.nii.gz", array, affine)

    cfg = PreprocessConfig(
        spacing=(1.0, 1.0, 1.0),
        shape=(64, 64, 64),
        fit="pad",
        crop_foreground=False,
        intensity={"mode": "none"},
        views={"mode": "max", "thickness": 1000},
    )
    arrays, _ = preprocess_volume(read_volume(path), None, cfg)
    views = arrays["views"][:, 0]
    grid_inv = np.linalg.inv(arrays["affine"])
    i, j, k = (grid_inv @ np.array([*marker_world, 1.0]))[:3]
    n = 64
    expected = {  # (row, col) per the radiological convention in pipeline.preprocess.views
        "axial": (n - 1 - j, n - 1 - i),
        "coronal": (n - 1 - k, n - 1 - i),
        "sagittal": (n - 1 - k, n - 1 - j),
    }
    centre = (n - 1) / 2
    for v, name in enumerate(("axial", "coronal", "sagittal")):
        row, col = np.argwhere(views[v] > 0.5 * views[v].max()).mean(axis=0)  # the marker's centroid
        assert abs(row - expected[name][0]) <= 1.0 and abs(col - expected[name][1]) <= 1.0, (kind, name)
        assert row < centre and col < centre, (kind, name)  # above and left of the centre
    # The grid is RAS-aligned whatever the input orientation.
    assert nib.aff2axcodes(arrays["affine"]) == ("R", "A", "S")


def test_ras_and_lps_copies_of_one_scan_give_identical_views(tmp_path):
    rng = np.random.default_rng(0)
    shape, spacing = (40, 36, 20), (1.2, 1.2, 2.5)
    ras = rng.normal(0, 1, shape).astype(np.float32)
    affine_ras = _phantom_affine("RAS", spacing, shape)
    affine_lps = _phantom_affine("LPS", spacing, shape)
    lps = ras[::-1, ::-1, :].copy()  # the same world content stored with flipped i, j
    cfg = PreprocessConfig(
        spacing=(1.5, 1.5, 1.5),
        shape=(48, 48, 48),
        fit="pad",
        crop_foreground=False,
        intensity={"mode": "none"},
        cache_volume=True,
    )
    a, _ = preprocess_volume(read_volume(save_nifti(tmp_path / "ras.nii.gz", ras, affine_ras)), None, cfg)
    b, _ = preprocess_volume(read_volume(save_nifti(tmp_path / "lps.nii.gz", lps, affine_lps)), None, cfg)
    np.testing.assert_allclose(a["views"], b["views"], atol=1e-5)
    np.testing.assert_allclose(a["volume"].astype(np.float32), b["volume"].astype(np.float32), atol=1e-2)


@pytest.mark.parametrize("flip", [(True, False, False), (False, True, True)], ids=["x", "yz"])
def test_foreground_box_is_exact_whichever_way_the_volume_is_stored(monkeypatch, flip):
    """The strided search's bounds are refined at full resolution, so a flipped copy of the same
    scan (same world, storage reversed) gets the same box, and that box is the voxels' own."""
    import SimpleITK as sitk

    from pipeline.io import Volume
    from pipeline.preprocess import spatial

    monkeypatch.setattr(spatial, "SAMPLE_VOXELS", 1000)  # a stride of 4 on this 41 x 37 x 31 grid
    array = np.zeros((31, 37, 41), dtype=np.int16)  # (z, y, x)
    array[5:22, 3:30, 7:33] = 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.0))
    image.SetOrigin((-10.0, 4.0, 30.0))
    flipped = sitk.Flip(image, list(flip))  # the same world, the storage reversed along those axes
    boxes = [spatial.foreground_box(Volume(im, "scan.nii.gz"), 50.0) for im in (image, flipped)]
    spacing, origin = np.array([0.7, 0.9, 2.0]), np.array([-10.0, 4.0, 30.0])
    first, last = np.array([7, 3, 5]), np.array([32, 29, 21])  # (x, y, z) voxel indices
    exact_lo, exact_hi = origin + (first - 0.5) * spacing, origin + (last + 0.5) * spacing
    for lo, hi, _ in boxes:  # world in RAS: SimpleITK's LPS x and y negate and swap ends
        assert np.allclose(np.sort(-np.array([exact_lo[:2], exact_hi[:2]]), axis=0), [lo[:2], hi[:2]])
        assert np.allclose([exact_lo[2], exact_hi[2]], [lo[2], hi[2]])


@pytest.mark.parametrize("degrees", [10.0, 20.0])
def test_an_oblique_scan_gets_the_box_of_its_content(degrees, tmp_path):
    """A body stored on a grid rotated about z keeps its own world extent (within a stride), not
    the wider box of the rotated index box's corners, so `fit: resize` keeps its scale."""
    from pipeline.preprocess import spatial

    def scan(affine: np.ndarray, shape: tuple[int, int, int]):
        """An 80 x 60 x 50 mm body centred on the world origin, sampled on ``affine``'s grid."""
        index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
        world = index @ affine[:3, :3].T + affine[:3, 3]
        inside = np.all(np.abs(world) <= [40.0, 30.0, 25.0], axis=-1)
        return read_volume(
            save_nifti(tmp_path / "scan.nii.gz", np.where(inside, 100, 0).astype(np.int16), affine)
        )

    theta = np.radians(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    shape = (90, 90, 30)
    affine = np.eye(4)
    affine[:3, :3] = rotation * 1.25
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    lo, hi, _ = spatial.foreground_box(scan(affine, shape), 50.0)
    step = max(1, int(np.ceil((np.prod(shape) / spatial.SAMPLE_VOXELS) ** (1 / 3))))
    stride_mm = step * 1.25 * (np.cos(theta) + np.sin(theta))
    np.testing.assert_allclose(hi[:2] - lo[:2], [80.0, 60.0], atol=2 * stride_mm)
    assert np.all(hi[:2] - lo[:2] >= [80.0 - 2.5, 60.0 - 2.5])  # nothing cut off
