"""Synthetic chest CT cohort: determinism, class fraction, HU ranges, orientation and world geometry,
lesions."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from pipeline.synth import generate_case, write_cohort
from pipeline.synth.cohort import case_seed

COHORT = {"n": 12, "positive_fraction": 0.25, "size": 64, "seed": 5}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A small cohort on disk: its folder, manifest rows and cohort.json."""
    out = tmp_path_factory.mktemp("cohort")
    args = dict(COHORT)
    manifest = write_cohort(out, args.pop("n"), args.pop("positive_fraction"), **args)
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, json.loads((out / "cohort.json").read_text())


def _load(out, relative):
    image = nib.load(out / relative)
    return np.asarray(image.dataobj), image.affine


def _voxel(affine, point):
    return tuple(np.rint((np.linalg.inv(affine) @ np.r_[point, 1.0])[:3]).astype(int))


def _world_centroid(mask, affine, label):
    ijk = np.argwhere(mask == label).mean(axis=0)
    return (affine @ np.r_[ijk, 1.0])[:3]


def test_same_seed_same_case_other_seed_differs():
    a = generate_case(11, positive=True, size=64)
    b = generate_case(11, positive=True, size=64)
    c = generate_case(12, positive=True, size=64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.affine, b.affine) and a.lesion_center_ras == b.lesion_center_ras
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    assert a.lesion_center_ras != c.lesion_center_ras


def test_cohort_files_are_byte_identical_per_seed(cohort, tmp_path):
    out, rows, _ = cohort
    again = write_cohort(tmp_path / "again", **COHORT).parent
    other = write_cohort(tmp_path / "other", n=2, positive_fraction=0.5, size=64, seed=6).parent
    for name in ("manifest.csv", "cohort.json", *(r["image"] for r in rows), *(r["mask"] for r in rows)):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert (out / rows[0]["image"]).read_bytes() != (other / "images/phantom_0000.nii.gz").read_bytes()


def test_case_does_not_depend_on_cohort_size(cohort):
    out, rows, meta = cohort
    case = generate_case(case_seed(COHORT["seed"], 3), positive=rows[3]["label"] == "lesion", size=64)
    image, affine = _load(out, rows[3]["image"])
    assert meta["cases"][3]["seed"] == case_seed(COHORT["seed"], 3)
    assert np.array_equal(image, case.image) and np.allclose(affine, case.affine)


@pytest.mark.parametrize(("n", "fraction"), [(12, 0.25), (7, 0.3), (5, 0.0), (4, 1.0)])
def test_manifest_has_the_requested_class_fraction(tmp_path, n, fraction):
    manifest = write_cohort(tmp_path, n, fraction, size=48, depth=16, seed=1)
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["case_id", "image", "mask", "label", "patient_id"]
    assert [r["case_id"] for r in rows] == [f"phantom_{i:04d}" for i in range(n)]
    assert sum(r["label"] == "lesion" for r in rows) == round(n * fraction)
    assert sum(r["label"] == "normal" for r in rows) == n - round(n * fraction)
    for r in rows:
        assert r["patient_id"] == r["case_id"]
        assert (tmp_path / r["image"]).is_file() and (tmp_path / r["mask"]).is_file()


def test_files_have_the_right_types_and_shared_grid(cohort):
    out, rows, _ = cohort
    for r in rows[:4]:
        image, mask = nib.load(out / r["image"]), nib.load(out / r["mask"])
        assert image.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert image.shape == mask.shape and np.allclose(image.affine, mask.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1, 2}


def test_tissue_intensities_are_in_hu(cohort):
    out, rows, _ = cohort
    for r in rows:
        image, _ = _load(out, r["image"])
        mask, _ = _load(out, r["mask"])
        lung = image[mask > 0]
        assert -900 < lung.mean() < -750, r["case_id"]
        assert np.mean(lung > -500) < 0.1  # vessels are a small part of the lung
        body = image[(image > -500) & (mask == 0)]
        assert 0 < np.median(body) < 80  # mostly soft tissue,
        assert 0.05 < np.mean((body > -160) & (body < -40)) < 0.5  # a fat layer
        assert 0.005 < np.mean(body > 300) < 0.1  # and bone
        corners = np.concatenate([image[:3, :3].ravel(), image[-3:, -3:].ravel()])
        assert abs(corners.mean() + 1000) < 15


def test_orientations_vary_and_some_affines_are_oblique(cohort):
    out, rows, meta = cohort
    codes, oblique = set(), 0
    for r, case in zip(rows, meta["cases"], strict=True):
        _, affine = _load(out, r["image"])
        code = "".join(nib.aff2axcodes(affine))
        assert code == case["orientation"]
        codes.add(code)
        direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        tilted = np.abs(direction).max(axis=0).min() < np.cos(np.deg2rad(4))
        assert tilted == bool(case["oblique"])
        oblique += tilted
    assert {"RAS", "LPS", "LAS"} <= codes
    assert 1 <= oblique < len(rows)


def test_world_geometry_holds_in_every_orientation(cohort):
    out, rows, meta = cohort
    for r, case in zip(rows, meta["cases"], strict=True):
        image, affine = _load(out, r["image"])
        mask, _ = _load(out, r["mask"])
        right, left = _world_centroid(mask, affine, 1), _world_centroid(mask, affine, 2)
        assert right[0] > 20 and left[0] < -20, r["case_id"]  # RAS+: +x is the patient's right
        marks = case["landmarks_ras"]
        assert image[_voxel(affine, marks["trachea"])] < -700
        assert mask[_voxel(affine, marks["trachea"])] == 0
        assert -60 < image[_voxel(affine, marks["heart"])] < 140
        assert image[_voxel(affine, marks["spine"])] > 250
        assert marks["trachea"][2] > marks["heart"][2] + 30  # trachea superior to the heart
        assert marks["spine"][1] < marks["heart"][1] - 20  # spine posterior to the heart
        assert marks["heart"][0] < 0  # heart left of the midline


@pytest.mark.parametrize(("code", "oblique"), [("LPS", False), ("LAS", False), ("LPS", True), ("PIL", False)])
def test_reorienting_to_ras_gives_the_same_anatomy(code, oblique):
    ras = generate_case(21, positive=True, size=64, orientation="RAS", oblique=oblique)
    other = generate_case(21, positive=True, size=64, orientation=code, oblique=oblique)
    assert "".join(nib.aff2axcodes(other.affine)) == code
    assert not np.array_equal(other.affine, ras.affine)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(other.image, other.affine))
    assert np.allclose(canonical.affine, ras.affine)
    assert np.array_equal(np.asarray(canonical.dataobj), ras.image)
    ornt = nib.orientations.io_orientation(other.affine)
    assert np.array_equal(nib.orientations.apply_orientation(other.mask, ornt), ras.mask)
    assert other.lesion_center_ras == ras.lesion_center_ras


def test_lesions_are_soft_tissue_inside_a_lung(cohort):
    out, rows, meta = cohort
    positives = [(r, c) for r, c in zip(rows, meta["cases"], strict=True) if r["label"] == "lesion"]
    assert len(positives) == 3
    for r, case in positives:
        image, affine = _load(out, r["image"])
        mask, _ = _load(out, r["mask"])
        centre = _voxel(affine, case["lesion_center_ras"])
        assert mask[centre] == (1 if case["lesion"]["lung"] == "right" else 2)
        ijk = np.indices(image.shape).reshape(3, -1).T
        world = ijk @ affine[:3, :3].T + affine[:3, 3]
        near = np.linalg.norm(world - case["lesion_center_ras"], axis=1) < case["lesion"]["radius_mm"] / 2
        assert near.sum() >= 1 and -40 < image.reshape(-1)[near].mean() < 120
    for r, case in zip(rows, meta["cases"], strict=True):
        if r["label"] == "normal":
            assert case["lesion_center_ras"] is None and case["lesion"] is None


def test_the_lesion_is_the_only_difference_between_classes():
    positive = generate_case(8, positive=True, size=96, orientation="LPS")
    negative = generate_case(8, positive=False, size=96, orientation="LPS")
    assert positive.label == 1 and negative.label == 0 and negative.lesion_center_ras is None
    assert np.array_equal(positive.mask, negative.mask)  # the lesion stays in the lung mask
    diff = np.argwhere(positive.image != negative.image)
    world = diff @ positive.affine[:3, :3].T + positive.affine[:3, 3]
    reach = np.linalg.norm(world - positive.lesion_center_ras, axis=1)
    radius = positive.meta["lesion"]["radius_mm"]
    assert len(diff) > 10 and reach.max() < 2.0 * radius + 2 * max(positive.meta["spacing"])
    centre = _voxel(positive.affine, positive.lesion_center_ras)
    assert int(positive.image[centre]) - int(negative.image[centre]) > 400


def test_size_and_depth_are_honoured_and_spacing_is_anisotropic():
    case = generate_case(3, positive=False, size=80, depth=24)
    assert case.image.shape == (80, 80, 24)
    spacing = sorted(nib.affines.voxel_sizes(case.affine))
    assert spacing[0] == pytest.approx(spacing[1]) and 320 / 80 <= spacing[0] <= 400 / 80
    default = generate_case(3, positive=False)
    sizes = nib.affines.voxel_sizes(default.affine)
    assert 128 <= default.image.shape[0] <= 192 and 2.0 <= sizes[2] <= 3.0
    assert 250 <= sizes[2] * default.image.shape[2] <= 330


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="positive_fraction"):
        write_cohort(tmp_path, 3, 1.5)
    with pytest.raises(ValueError, match="size"):
        generate_case(0, positive=False, size=8)
    with pytest.raises(ValueError, match="orientation"):
        generate_case(0, positive=False, size=64, orientation="RRS")
    assert not (tmp_path / "manifest.csv").exists()
