"""A bad-input corpus generated on the fly: every kind gives a clear error naming the file.

Each builder writes one broken input into a folder and returns its path and a pattern for the
reason the error must give. The same corpus, mixed with good cases, then goes through the whole
preprocess stage (serially, on two worker processes, and through the CLI): every bad case gets
exactly one ``error`` ledger row naming its file, and the good ones finish.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.io import VolumeError, read_volume, save_nifti
from pipeline.preprocess.stage import preprocess_volume, run_preprocess

Builder = Callable[[Path, Callable[..., Path]], Path]


def _patch_nifti(path: Path, out: Path, **fields: object) -> Path:
    """Copy an uncompressed NIfTI-1 file, setting raw header fields (no nibabel 'fixes')."""
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]), check=False)
    for key, value in fields.items():
        header[key] = value
    raw[:348] = header.binaryblock
    data = bytes(raw)
    out.write_bytes(gzip.compress(data) if out.name.endswith(".gz") else data)
    return out


def _pixdim(make_ct: Callable[..., Path], folder: Path, name: str, value: float) -> Path:
    src = make_ct(folder / f"src_{name}.nii")
    pixdim = nib.Nifti1Header(src.read_bytes()[:348], check=False)["pixdim"].copy()
    pixdim[1] = value
    out = _patch_nifti(src, folder / f"{name}.nii.gz", pixdim=pixdim)
    src.unlink()
    return out


def empty_file(folder, make_ct):
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def truncated_gzip(folder, make_ct):
    good = make_ct(folder / "whole.nii.gz", shape=(40, 36, 30))
    data = good.read_bytes()
    path = folder / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    good.unlink()
    return path


def truncated_nii(folder, make_ct):
    good = make_ct(folder / "whole.nii")
    data = good.read_bytes()
    path = folder / "cut_short.nii"
    path.write_bytes(data[: len(data) - 1000])
    good.unlink()
    return path


def corrupt_gzip(folder, make_ct):
    header = gzip.compress(b"")[:10]  # a valid gzip member header, then garbage
    path = folder / "corrupt.nii.gz"
    path.write_bytes(header + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    return path


def corrupt_gzip_body(folder, make_ct):
    """A gzip whose header and first blocks decode, but whose body is damaged further on."""
    good = make_ct(folder / "whole.nii", shape=(40, 36, 30))
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, good.stat().st_size - 352, dtype=np.uint8).tobytes()
    noisy = good.read_bytes()[:352] + noise
    data = bytearray(gzip.compress(noisy, compresslevel=1))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path = folder / "damaged.nii.gz"
    path.write_bytes(bytes(data))
    good.unlink()
    return path


def text_as_nii_gz(folder, make_ct):
    path = folder / "notes.nii.gz"
    path.write_text("patient notes, not an image\n" * 20)
    return path


def text_as_nii(folder, make_ct):
    path = folder / "readme.nii"
    path.write_text("this is not a NIfTI file\n" * 50)
    return path


def huge_nifti_header(folder, make_ct):
    """A valid small NIfTI-1 whose header then claims 30000^3 voxels (int16 dims max out at 32767)."""
    src = make_ct(folder / "small.nii")
    path = _patch_nifti(src, folder / "huge.nii", dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    src.unlink()
    return path


def huge_mha_header(folder, make_ct):
    """A MetaImage header that claims 100000^3 voxels, with a few bytes of data."""
    path = folder / "huge.mha"
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "ElementSpacing = 1 1 1\nDimSize = 100000 100000 100000\nElementType = MET_SHORT\n"
        "ElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + bytes(64))
    return path


def zero_spacing(folder, make_ct):
    return _pixdim(make_ct, folder, "zero_spacing", 0.0)


def negative_spacing(folder, make_ct):
    return _pixdim(make_ct, folder, "negative_spacing", -1.5)


def nan_spacing(folder, make_ct):
    return _pixdim(make_ct, folder, "nan_spacing", float("nan"))


def qform_sform_disagree(folder, make_ct):
    """sform code 2 the true grid, qform code 1 mirrored left-right: ITK and nibabel disagree."""
    path = folder / "qform_sform_disagree.nii.gz"
    sform = np.diag([1.5, 1.5, 2.5, 1.0])
    image = nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), sform)
    image.set_sform(sform, code=2)
    image.set_qform(np.diag([-1.5, 1.5, 2.5, 1.0]), code=1)
    nib.save(image, path)
    return path


def four_d(folder, make_ct):
    path = folder / "four_d.nii.gz"
    data = np.stack([np.full((12, 10, 8), 100 * t, np.int16) for t in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


def two_d(folder, make_ct):
    path = folder / "two_d.nii.gz"
    data = np.arange(12 * 10, dtype=np.int16).reshape(12, 10)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 1.0, 1.0])), path)
    return path


def nonfinite_voxels(folder, make_ct):
    path = folder / "nonfinite.nii.gz"
    data = np.full((12, 10, 8), 5.0, np.float32)
    data[1, 2, 3], data[4, 5, 6], data[7, 8, 1] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def nonfinite_nrrd(folder, make_ct):
    path = folder / "nonfinite.nrrd"
    data = np.full((8, 10, 12), 5.0, np.float32)
    data[3, 2, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(data), str(path))
    return path


def rgb_image(folder, make_ct):
    path = folder / "rgb.nrrd"
    image = sitk.GetImageFromArray(np.zeros((8, 10, 12, 3), np.uint8), isVector=True)
    sitk.WriteImage(image, str(path))
    return path


def missing_file(folder, make_ct):
    return folder / "does_not_exist.nii.gz"


def no_dicom_series(folder, make_ct):
    path = folder / "empty_scan_folder"
    path.mkdir()
    (path / "notes.txt").write_text("no images here\n")
    return path


def junk_dcm(folder, make_ct):
    scan = folder / "scan_with_junk"
    scan.mkdir()
    path = scan / "IM0001.dcm"
    path.write_bytes(b"DICM? no, just junk " * 40)
    return path


def mhd_missing_raw(folder, make_ct):
    path = folder / "lost.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 10, 12), np.int16)), str(path))
    (folder / "lost.raw").unlink()
    return path


def mhd_short_raw(folder, make_ct):
    path = folder / "short.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 10, 12), np.int16)), str(path))
    raw = folder / "short.raw"
    raw.write_bytes(raw.read_bytes()[:500])
    return path


def _mhd_naming(folder: Path, name: str, data_file: str) -> Path:
    """A small .mhd whose ElementDataFile is ``data_file`` (written by ITK, then edited)."""
    path = folder / f"{name}.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4), np.uint8)), str(path))
    text = path.read_text(encoding="latin-1")
    text = text.replace(f"ElementDataFile = {name}.raw", f"ElementDataFile = {data_file}")
    path.write_text(text, encoding="latin-1")
    return path


def mhd_pattern(folder, make_ct):  # ITK's reader dies of a segfault on this one (SimpleITK 2.x)
    return _mhd_naming(folder, "pattern", "/etc/host%s 1 2 1")


def mhd_outside(folder, make_ct):
    inner = folder / "inner"
    inner.mkdir()
    (folder / "secret.raw").write_bytes(bytes(32))
    return _mhd_naming(inner, "outside", "../secret.raw")


def mhd_device(folder, make_ct):
    return _mhd_naming(folder, "device", "/dev/zero")


def nhdr_outside(folder, make_ct):
    path = folder / "outside.nhdr"
    path.write_text(
        "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 2\nencoding: raw\ndata file: /dev/urandom\n\n",
        encoding="latin-1",
    )
    return path


def trailing_bomb(folder, make_ct):
    """A whole small .nii.gz followed, in the same gzip stream, by 200 MB of zeros."""
    src = make_ct(folder / "small.nii")
    path = folder / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(src.read_bytes())
        for _ in range(100):
            fh.write(bytes(2 << 20))
    src.unlink()
    return path


def tiny_gz_huge_claim(folder, make_ct):
    """A 1000^3 int16 header in a gzip of a few hundred bytes: no file that small holds 2 GB."""
    src = make_ct(folder / "small.nii")
    patched = _patch_nifti(src, folder / "claim.nii", dim=[3, 1000, 1000, 1000, 1, 1, 1, 1])
    path = folder / "claim.nii.gz"
    path.write_bytes(gzip.compress(patched.read_bytes()[:352]))
    src.unlink()
    patched.unlink()
    return path


def png_slice(folder, make_ct):
    path = folder / "screenshot.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64), 120, np.uint8)), str(path))
    return path


# kind -> (builder, pattern the reason must match)
CORPUS: dict[str, tuple[Builder, str]] = {
    "empty_file": (empty_file, r"empty file \(0 bytes\)"),
    "truncated_gzip": (truncated_gzip, r"truncated gzip"),
    "truncated_nii": (truncated_nii, r"truncated data"),
    "corrupt_gzip": (corrupt_gzip, r"corrupt gzip"),
    "corrupt_gzip_body": (corrupt_gzip_body, r"corrupt gzip"),
    "text_as_nii_gz": (text_as_nii_gz, r"not a readable image"),
    "text_as_nii": (text_as_nii, r"not a readable image"),
    "huge_nifti_header": (huge_nifti_header, r"exceed the limit of 1,000,000,000 \(io\.max_voxels\)"),
    "huge_mha_header": (huge_mha_header, r"1,000,000,000,000,000 voxels .*exceed the limit"),
    "zero_spacing": (zero_spacing, r"spacing \(pixdim\) \(0\.0, .*not finite and positive"),
    "negative_spacing": (negative_spacing, r"spacing \(pixdim\) \(-1\.5, .*not finite and positive"),
    "nan_spacing": (nan_spacing, r"spacing \(pixdim\) \(nan, .*not finite and positive"),
    "four_d": (four_d, r"4D image .*volume index"),
    "qform_sform_disagree": (
        qform_sform_disagree,
        r"qform \(code 1\) and sform \(code 2\) disagree by up to 33\.0 mm",
    ),
    "two_d": (two_d, r"2D image .*allow_2d"),
    "nonfinite_voxels": (nonfinite_voxels, r"\b3 NaN/Inf voxels"),
    "nonfinite_nrrd": (nonfinite_nrrd, r"\b1 NaN/Inf voxels"),
    "rgb_image": (rgb_image, r"3-component \(RGB/vector\)"),
    "missing_file": (missing_file, r"file not found"),
    "no_dicom_series": (no_dicom_series, r"no readable DICOM series"),
    "junk_dcm": (junk_dcm, r"not a readable image"),
    "mhd_missing_raw": (mhd_missing_raw, r"data file lost\.raw not found"),
    "mhd_short_raw": (mhd_short_raw, r"truncated or corrupt image data"),
    "mhd_pattern": (mhd_pattern, r"ElementDataFile '/etc/host%s 1 2 1' is a file-name pattern"),
    "mhd_outside": (mhd_outside, r"ElementDataFile '\.\./secret\.raw' lies outside the header's folder"),
    "mhd_device": (mhd_device, r"ElementDataFile '/dev/zero' lies outside"),
    "nhdr_outside": (nhdr_outside, r"data file '/dev/urandom' lies outside"),
    "trailing_bomb": (trailing_bomb, r"more than 64 MiB of data after the voxels"),
    "tiny_gz_huge_claim": (
        tiny_gz_huge_claim,
        r"promises 2,000,000,352 bytes, more than this .*-byte gzip file can hold",
    ),
    "png_slice": (png_slice, r"a PNG image holds no scanner intensities .* NIfTI, NRRD/MHA or DICOM"),
}


def test_legitimate_detached_data_spacing_units_and_offsets_still_read(tmp_path, make_ct):
    """What the bomb and detached-file checks must let through."""
    annex = tmp_path / "annex"
    annex.mkdir()
    linked = _mhd_naming(tmp_path, "linked", "linked.raw")
    (tmp_path / "linked.raw").rename(annex / "obj.raw")  # a DataLad/git-annex layout: data linked away
    (tmp_path / "linked.raw").symlink_to(annex / "obj.raw")
    sub = tmp_path / "slices"
    sub.mkdir()
    for k in range(2):
        (sub / f"s{k:03d}.raw").write_bytes(bytes([k + 1]) * 16)
    pattern = tmp_path / "pattern.nhdr"
    pattern.write_text(
        "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 2\nencoding: raw\n"
        "data file: slices/s%03d.raw 0 1 1 2\n\n",
        encoding="latin-1",
    )
    micro = tmp_path / "micro.nii.gz"
    image = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.diag([5e-5, 5e-5, 5e-5, 1]))
    image.header.set_xyzt_units("meter")
    nib.save(image, micro)
    early = _patch_nifti(make_ct(tmp_path / "src.nii"), tmp_path / "early.nii", vox_offset=348)
    for path, shape in ((linked, (4, 4, 2)), (pattern, (4, 4, 2)), (micro, (8, 8, 8)), (early, None)):
        volume = read_volume(path)
        assert shape is None or volume.shape == shape, path.name
    np.testing.assert_array_equal(np.unique(read_volume(pattern).array), [1, 2])  # both slice files


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_bad_input_gives_named_error(kind, tmp_path, make_ct):
    builder, reason = CORPUS[kind]
    path = builder(tmp_path, make_ct)
    with pytest.raises(VolumeError) as info:
        read_volume(path)
    err = info.value
    assert Path(err.path).name == path.name
    assert path.name in str(err)
    assert re.search(reason, err.reason), f"{kind}: reason {err.reason!r} does not match {reason!r}"


def test_corpus_has_enough_kinds():
    assert len(CORPUS) >= 14


def test_voxel_limit_is_configurable(tmp_path, make_ct):
    path = make_ct(tmp_path / "ct.nii.gz", shape=(24, 20, 16))
    assert read_volume(path, max_voxels=24 * 20 * 16).shape == (24, 20, 16)
    with pytest.raises(VolumeError, match=r"7,680 voxels .*exceed the limit of 7,679"):
        read_volume(path, max_voxels=24 * 20 * 16 - 1)


def test_four_d_with_volume_index_picks_that_volume(tmp_path, make_ct):
    path = four_d(tmp_path, make_ct)
    for t in range(3):
        volume = read_volume(path, volume_index=t)
        assert volume.shape == (12, 10, 8)
        assert np.all(volume.array == 100 * t)
    with pytest.raises(VolumeError, match=r"volume index 3 is outside 0\.\.2"):
        read_volume(path, volume_index=3)


def test_two_d_with_allow_2d_is_a_one_slice_volume(tmp_path, make_ct):
    path = two_d(tmp_path, make_ct)
    volume = read_volume(path, allow_2d=True)
    assert volume.shape == (12, 10, 1)
    np.testing.assert_array_equal(volume.array[:, :, 0], np.asanyarray(nib.load(path).dataobj))
    np.testing.assert_allclose(volume.spacing[:2], (0.7, 0.8), rtol=1e-6)


def test_a_two_d_nifti_keeps_its_slab_thickness_and_position(tmp_path):
    """ITK reads a 2D NIfTI's plane alone; the header's third axis (pixdim[3], the slice's z, an
    oblique tilt) must survive, so the slice reads exactly as the same data stored (X, Y, 1)."""
    tilt = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    affine = np.eye(4)
    affine[:3, :3] = tilt @ np.diag([0.725, 0.7, 6.25])
    affine[:3, 3] = [-100.0, -80.0, 42.5]
    data = np.arange(12 * 10, dtype=np.int16).reshape(12, 10)
    flat = read_volume(save_nifti(tmp_path / "flat.nii.gz", data, affine), allow_2d=True)
    slab = read_volume(save_nifti(tmp_path / "slab.nii.gz", data[:, :, None], affine), allow_2d=True)
    assert flat.shape == slab.shape == (12, 10, 1)
    np.testing.assert_allclose(flat.affine, affine, atol=1e-5)
    np.testing.assert_allclose(flat.affine, slab.affine, atol=1e-5)
    np.testing.assert_array_equal(flat.array, slab.array)


def test_a_two_d_nifti_without_qform_or_sform_keeps_itks_plane_and_its_thickness(tmp_path):
    data = np.arange(12 * 10, dtype=np.int16).reshape(12, 10)
    paths = []
    for name, array in (("flat", data), ("slab", data[:, :, None])):
        nib.save(nib.Nifti1Image(array, np.diag([0.7, 0.7, 5.0, 1.0])), tmp_path / f"src_{name}.nii")
        paths.append(
            _patch_nifti(tmp_path / f"src_{name}.nii", tmp_path / f"{name}.nii", qform_code=0, sform_code=0)
        )
    flat, slab = (read_volume(path, allow_2d=True) for path in paths)
    np.testing.assert_allclose(flat.affine, slab.affine, atol=1e-6)
    assert flat.spacing[2] == pytest.approx(5.0)


@pytest.mark.parametrize(("axis", "plane"), [(1, "coronal"), (0, "sagittal")])
def test_a_single_slice_that_is_not_axial_is_refused(tmp_path, axis, plane):
    shape = [12, 10, 8]
    shape[axis] = 1
    path = save_nifti(tmp_path / f"{plane}.nii.gz", np.zeros(shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(VolumeError, match=rf"{plane}.nii.gz: a single {plane} slice .*axial slices only"):
        read_volume(path, allow_2d=True)


@pytest.mark.parametrize(("axis", "plane"), [(1, "coronal"), (0, "sagittal")])
def test_a_2d_nifti_whose_affine_is_not_axial_is_refused_by_plane(tmp_path, axis, plane):
    """ITK would call the in-plane corner of such an affine singular; the plane is the reason."""
    affine = np.eye(4)
    affine[:3, :3] = np.eye(3)[
        :, [a for a in range(3) if a != axis] + [axis]
    ]  # the image's j-axis leaves the plane
    path = tmp_path / f"{plane}2d.nii"
    nib.save(nib.Nifti1Image(np.zeros((12, 10), np.int16), affine), path)
    with pytest.raises(VolumeError, match=rf"{plane}2d.nii: a single {plane} slice \(12, 10, 1\)"):
        read_volume(path, allow_2d=True)


@pytest.mark.parametrize("builder", [nonfinite_voxels, nonfinite_nrrd])
def test_nonfinite_zero_replaces_them_with_zero(builder, tmp_path, make_ct):
    path = builder(tmp_path, make_ct)
    array = read_volume(path, nonfinite="zero").array
    assert np.isfinite(array).all()
    assert np.count_nonzero(array == 0) == (3 if builder is nonfinite_voxels else 1)
    assert np.count_nonzero(array == 5.0) == array.size - np.count_nonzero(array == 0)


def test_good_gzip_with_a_mismatched_size_trailer_still_reads(tmp_path, make_ct):
    """Two gzip members (legal, e.g. from concatenation) must not be taken for a truncated file."""
    good = make_ct(tmp_path / "ct.nii")
    data = good.read_bytes()
    path = tmp_path / "two_members.nii.gz"
    path.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    np.testing.assert_array_equal(read_volume(path).array, read_volume(good).array)


def test_mask_on_another_grid_is_an_error_naming_the_mask(tmp_path, make_ct):
    image = read_volume(make_ct(tmp_path / "ct.nii.gz"))
    mask = read_volume(make_ct(tmp_path / "mask_wrong_grid.nii.gz", shape=(20, 20, 16), dtype=np.uint8))
    cfg = load_config(None, **{"preprocess.shape": [16, 16, 16]}).preprocess
    with pytest.raises(VolumeError, match=r"mask shape \(20, 20, 16\) does not match the image's") as info:
        preprocess_volume(image, mask, cfg)
    assert "mask_wrong_grid.nii.gz" in str(info.value)
    shifted = np.diag([1.5, 1.5, 2.5, 1.0])  # the image's shape and spacing, another origin
    mask = read_volume(make_ct(tmp_path / "mask_shifted.nii.gz", affine=shifted, dtype=np.uint8))
    with pytest.raises(
        VolumeError, match=r"mask_shifted.*differs .* by up to 18.8 mm .*origin \[0.0, 0.0, 0.0\]"
    ):
        preprocess_volume(image, mask, cfg)


def test_a_view_point_outside_the_scan_is_an_error_not_an_edge_view(tmp_path, make_ct):
    image = read_volume(make_ct(tmp_path / "ct.nii.gz"))  # 24 x 20 x 16 voxels of 1.5 x 1.5 x 2.5 mm, centred
    overrides = {"preprocess.shape": [16, 16, 16], "preprocess.views.center": "point"}
    inside = load_config(None, **overrides, **{"preprocess.views.point": [3.0, -2.0, 4.0]}).preprocess
    assert preprocess_volume(image, None, inside)[0]["views"].shape[0] == 3
    outside = load_config(None, **overrides, **{"preprocess.views.point": [0.0, -80.0, 5.0]}).preprocess
    with pytest.raises(
        VolumeError, match=r"ct.nii.gz: views.point \[0.0, -80.0, 5.0\] .* outside the preprocessed grid"
    ):
        preprocess_volume(image, None, outside)


# ---------------------------------------------------------------------------------------------
# The whole stage over a manifest that mixes every bad kind with good cases.


@pytest.fixture
def mixed_manifest(tmp_path, make_ct) -> tuple[Path, dict[str, str]]:
    """A manifest of every corpus kind plus three good cases and a mask on the wrong grid.

    Returns the manifest and, for every bad case id, the file name its error must name.
    """
    data = tmp_path / "data"
    data.mkdir()
    rows, bad = [], {}
    for kind, (builder, _) in sorted(CORPUS.items()):
        folder = data / kind  # each kind in its own folder, so file names cannot collide
        folder.mkdir()
        path = builder(folder, make_ct)
        rows.append({"case_id": kind, "image": path.relative_to(data).as_posix(), "mask": ""})
        bad[kind] = path.name
    for n in range(3):
        ct = make_ct(data / "good" / f"ct{n}.nii.gz", shape=(24 + 2 * n, 20, 16))
        rows.append({"case_id": f"good{n}", "image": ct.relative_to(data).as_posix(), "mask": ""})
    ct = make_ct(data / "good" / "masked.nii.gz")
    wrong = make_ct(data / "good" / "masked_wrong_grid.nii.gz", shape=(20, 20, 16), dtype=np.uint8)
    rows.append({"case_id": "bad_mask", "image": f"good/{ct.name}", "mask": f"good/{wrong.name}"})
    bad["bad_mask"] = wrong.name
    manifest = data / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["case_id", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest, bad


def _statuses(out: Path) -> dict[str, tuple[str, str]]:
    with (out / "ledger.csv").open(newline="") as fh:
        records = list(csv.DictReader(fh))
    ids = [r["case_id"] for r in records]
    assert len(ids) == len(set(ids)), "the ledger must have exactly one row per case"
    return {r["case_id"]: (r["status"], r["reason"]) for r in records}


def _config(manifest: Path, run: Path, workers: int = 0):
    return load_config(
        None,
        run=run,
        **{"data.manifest": manifest, "preprocess.shape": [16, 16, 16], "preprocess.workers": workers},
    )


def _check_run(out: Path, bad: dict[str, str]) -> dict[str, str]:
    ledger = _statuses(out)
    good = {f"good{n}" for n in range(3)}
    assert set(ledger) == set(bad) | good
    for cid, name in bad.items():
        status, reason = ledger[cid]
        assert status == "error", f"{cid}: {status} {reason}"
        assert name in reason, f"{cid}: the reason {reason!r} does not name {name}"
    for cid in good:
        assert ledger[cid][0] == "ok", ledger[cid]
        assert (out / "cache" / f"{cid}.npz").is_file()
    with (out / "cases.csv").open(newline="") as fh:
        cases = {r["case_id"]: r["status"] for r in csv.DictReader(fh)}
    assert cases == {cid: status for cid, (status, _) in ledger.items()}
    return {cid: status for cid, (status, _) in ledger.items()}


def test_preprocess_gives_one_error_row_per_bad_case(mixed_manifest, tmp_path, capsys):
    manifest, bad = mixed_manifest
    out = run_preprocess(_config(manifest, tmp_path / "run"))
    _check_run(out, bad)
    reasons = {cid: reason for cid, (_, reason) in _statuses(out).items()}
    assert re.search(r"file not found: missing_file/does_not_exist\.nii\.gz", reasons["missing_file"])

    # The CLI over the same run and settings: good cases are skipped, bad ones are tried again.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("preprocess:\n  shape: [16, 16, 16]\n")
    capsys.readouterr()
    argv = ["preprocess", "--manifest", str(manifest), "--run", str(tmp_path / "run"), "--config", str(cfg)]
    code = main(argv)
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(rf"0 ok, 3 skipped, {len(bad)} error", printed)
    lines = [ln.strip() for ln in printed.splitlines() if ln.strip().startswith("error ")]
    assert len(lines) == min(len(bad), 20)  # the CLI prints the first 20, then a count of the rest
    for line in lines:
        cid = line.removeprefix("error ").split(":", 1)[0]
        assert bad[cid] in line, line
    if len(bad) > 20:
        assert f"... and {len(bad) - 20} more errors in" in printed
    assert {cid: s for cid, (s, _) in _statuses(out).items()} == {
        **{cid: "error" for cid in bad},
        **{f"good{n}": "skipped" for n in range(3)},
    }


def test_preprocess_on_worker_processes_gives_the_same_statuses(mixed_manifest, tmp_path):
    manifest, bad = mixed_manifest
    serial = _check_run(run_preprocess(_config(manifest, tmp_path / "serial")), bad)
    pooled = _check_run(run_preprocess(_config(manifest, tmp_path / "pooled", workers=2)), bad)
    assert pooled == serial


def test_array_of_a_temporary_volume_stays_valid(tmp_path, make_ct):
    """``read_volume(p).array`` must not be a view of freed memory once the Volume is gone."""
    path = make_ct(tmp_path / "ct.nii.gz")
    expected = np.asanyarray(nib.load(path).dataobj)
    array = read_volume(path).array
    for n in range(5):  # reuse the freed memory, if the view does not hold the image
        read_volume(make_ct(tmp_path / f"other{n}.nii.gz", shape=(24, 20, 16), dtype=np.float32))
    np.testing.assert_array_equal(array, expected)
