"""Manifest validation, patient-grouped stratified splits and scan-folder discovery, on real files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.model_selection import GroupShuffleSplit

from pipeline.dicom_spacing import check_slice_spacing
from pipeline.io import VolumeError, read_volume
from pipeline.manifest import Case, CaseSet, ManifestError, assign_splits, discover_folder, read_manifest


def write_manifest(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path, make_ct) -> Path:
    """A data folder with three small CTs and a mask."""
    folder = tmp_path / "data"
    for name in ("a", "b", "c"):
        make_ct(folder / "images" / f"{name}.nii.gz")
    make_ct(folder / "masks" / "a.nii.gz", dtype=np.uint8)
    return folder


def by_id(case_set: CaseSet) -> dict[str, Case]:
    return {c.case_id: c for c in case_set.cases}


# ---------------------------------------------------------------------------------------------
# Validation


def test_good_manifest_reads_every_column(data):
    path = write_manifest(
        data,
        "case_id,image,label,mask,split,patient_id\n"
        "a,images/a.nii.gz,mass,masks/a.nii.gz,train,P1\n"
        "b,images/b.nii.gz,normal,,test,P2\n",
    )
    case_set = read_manifest(path, classes=["normal", "mass"])
    assert case_set.classes == ["normal", "mass"] and case_set.problems == []
    a, b = case_set.cases
    assert (a.case_id, a.label, a.split, a.patient_id) == ("a", 1, "train", "P1")
    assert a.image == data / "images" / "a.nii.gz" and a.mask == data / "masks" / "a.nii.gz"
    assert (b.label, b.mask, b.split) == (0, None, "test")


def test_missing_file_is_a_row_problem_naming_the_line_and_file(data):
    text = "case_id,image\na,images/a.nii.gz\nghost,images/ghost.nii.gz\nc,images/c.nii.gz\n"
    path = write_manifest(data, text)
    cases = by_id(read_manifest(path))
    assert cases["a"].problem is None and cases["c"].problem is None
    assert cases["ghost"].problem == "line 3: file not found: images/ghost.nii.gz"


def test_missing_mask_is_named_as_the_mask(data):
    path = write_manifest(data, "case_id,image,mask\na,images/a.nii.gz,masks/nope.nii.gz\n")
    (case,) = read_manifest(path).cases
    assert case.problem == "line 2: mask: file not found: masks/nope.nii.gz"


def test_duplicate_ids_are_fatal_and_all_listed(data):
    path = write_manifest(
        data,
        "case_id,image\na,images/a.nii.gz\nb,images/b.nii.gz\na,images/c.nii.gz\nb,images/a.nii.gz\n",
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.problems == [
        "line 4: duplicate case_id 'a' (first on line 2)",
        "line 5: duplicate case_id 'b' (first on line 3)",
    ]
    assert str(path) in str(info.value)


def test_case_ids_that_would_misbehave_as_file_names_or_cells_are_refused(data):
    ids = ["A", "a", "=HYPERLINK(x)", "line\u202eevil", ".hidden", "L" * 201]
    rows = "".join(f'"{cid}",images/a.nii.gz\n' for cid in ids)
    with pytest.raises(ManifestError) as info:
        read_manifest(write_manifest(data, f"case_id,image\n{rows}"))
    assert info.value.problems == [
        "line 3: duplicate case_id 'a' (first on line 2, 'A', which differs only in case)",
        "line 4: case_id '=HYPERLINK(x)' starts with '=', which a spreadsheet runs as a formula",
        "line 5: case_id 'line\\u202eevil' holds a control character or one that hides or reorders text",
        "line 6: case_id '.hidden' starts with '.', which would hide its output files",
        "line 7: case_id of 201 bytes is too long to name files (at most 200)",
    ]


def test_a_file_name_that_makes_a_bad_case_id_gets_its_own_row(tmp_path, make_ct):
    make_ct(tmp_path / "scans" / "ok.nii.gz")
    make_ct(tmp_path / "scans" / "+cmd.nii.gz")
    cases = by_id(discover_folder(tmp_path / "scans"))
    assert cases["ok"].problem is None
    assert cases["+cmd"].problem.endswith("'+cmd' starts with '+', which a spreadsheet runs as a formula")


def test_missing_and_unknown_columns_are_listed_together(data):
    path = write_manifest(data, "case_id,scan,notes\na,images/a.nii.gz,x\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0] == "missing required column 'image'"
    assert problems[1].startswith("unknown columns ['scan', 'notes']")


def test_unknown_column_alone_is_fatal(data):
    path = write_manifest(data, "case_id,image,labels\na,images/a.nii.gz,1\n")
    with pytest.raises(ManifestError, match=r"unknown columns \['labels'\]"):
        read_manifest(path)


def test_non_utf8_manifest_is_fatal_with_the_offset(data):
    path = data / "manifest.csv"
    data.mkdir(exist_ok=True)
    path.write_bytes("case_id,image\ncafé,images/a.nii.gz\n".encode("latin-1"))
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.problems == ["not UTF-8 text (bad byte at offset 17)"]


def test_utf8_bom_is_accepted(data):
    path = data / "manifest.csv"
    path.write_bytes("\ufeffcase_id,image\nré,images/a.nii.gz\n".encode())
    assert [c.case_id for c in read_manifest(path).cases] == ["ré"]


@pytest.mark.parametrize("text", ["case_id,image\n", ""], ids=["header_only", "zero_bytes"])
def test_empty_manifest_is_fatal(data, text):
    path = write_manifest(data, text)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    no_columns = ["missing required column 'case_id'", "missing required column 'image'"]
    expected = ["no rows"] if text else no_columns
    assert info.value.problems == expected


def test_unknown_label_with_declared_classes(data):
    path = write_manifest(
        data,
        "case_id,image,label\na,images/a.nii.gz,mass\nb,images/b.nii.gz,tumour\nc,images/c.nii.gz,2\n",
    )
    cases = by_id(read_manifest(path, classes=["normal", "mass"]))
    assert cases["a"].problem is None and cases["a"].label == 1
    assert cases["b"].problem == "line 3: label 'tumour' is not one of the classes ['normal', 'mass']"
    assert cases["c"].problem == "line 4: label '2' is not one of the classes ['normal', 'mass']"
    assert cases["b"].label is None and cases["c"].label is None


@pytest.mark.parametrize(
    ("labels", "classes"),
    [
        (("lesion", "normal", "lesion"), ["normal", "lesion"]),  # a negative name is class 0
        (("Tumour", "Healthy", "Tumour"), ["Healthy", "Tumour"]),
        (("mass", "cyst", "mass"), ["cyst", "mass"]),  # otherwise sorted
        (("benign", "normal", "mass"), ["benign", "mass", "normal"]),  # three classes: sorted
        (("10", "9", "9"), ["9", "10"]),  # integers numerically
    ],
)
def test_inferred_class_order(data, labels, classes):
    rows = "".join(f"{n},images/{n}.nii.gz,{label}\n" for n, label in zip("abc", labels, strict=True))
    case_set = read_manifest(write_manifest(data, "case_id,image,label\n" + rows))
    assert case_set.classes == classes
    assert [case_set.classes[c.label] for c in case_set.cases] == list(labels)


def test_labels_as_names_and_as_indices(data):
    text = "case_id,image,label\na,images/a.nii.gz,{}\nb,images/b.nii.gz,{}\nc,images/c.nii.gz,{}\n"
    declared = read_manifest(write_manifest(data, text.format("mass", "0", "1")), classes=["normal", "mass"])
    assert [c.label for c in declared.cases] == [1, 0, 1] and declared.problems == []
    # Undeclared names: the sorted distinct names.
    names = read_manifest(write_manifest(data, text.format("tumour", "mass", "tumour")))
    assert names.classes == ["mass", "tumour"] and [c.label for c in names.cases] == [1, 0, 1]
    # Undeclared integers: sorted numerically (so "10" comes after "2").
    ints = read_manifest(write_manifest(data, text.format("10", "2", "0")))
    assert ints.classes == ["0", "2", "10"] and [c.label for c in ints.cases] == [2, 1, 0]


def test_path_escaping_the_manifest_folder(tmp_path, data, make_ct):
    outside = make_ct(tmp_path / "elsewhere" / "x.nii.gz")
    text = f"case_id,image\nin,images/a.nii.gz\nup,../elsewhere/x.nii.gz\nabs,{outside}\n"
    path = write_manifest(data, text)
    cases = by_id(read_manifest(path))
    assert cases["in"].problem is None
    assert cases["up"].problem.startswith("line 3: path '../elsewhere/x.nii.gz' escapes the manifest folder")
    assert cases["abs"].problem.startswith(f"line 4: path '{outside}' escapes the manifest folder")
    allowed = by_id(read_manifest(path, allow_outside=True))
    assert all(c.problem is None for c in allowed.values())
    assert allowed["up"].image == outside and allowed["abs"].image == outside


def test_bad_split_value_is_a_row_problem(data):
    path = write_manifest(
        data,
        "case_id,image,split\na,images/a.nii.gz,train\nb,images/b.nii.gz,validation\nc,images/c.nii.gz,\n",
    )
    cases = by_id(read_manifest(path))
    assert cases["a"].problem is None and cases["a"].split == "train"
    assert cases["b"].problem == "line 3: split 'validation' is not one of ['train', 'val', 'test']"
    assert cases["c"].problem == "line 4: split None is not one of ['train', 'val', 'test']"


def test_row_problems_are_collected_per_row(data):
    path = write_manifest(
        data,
        "case_id,image,label,split\na,images/a.nii.gz,0,train\nb,images/zzz.nii.gz,7,holdout\n",
    )
    case_set = read_manifest(path, classes=["neg", "pos"])
    (problem,) = case_set.problems
    assert problem.startswith("b: line 3: file not found: images/zzz.nii.gz; label '7' is not one of")
    assert problem.endswith("split 'holdout' is not one of ['train', 'val', 'test']")


# ---------------------------------------------------------------------------------------------
# Splits


def cohort(n_cases: int = 60, n_patients: int = 25, seed: int = 0) -> CaseSet:
    """60 cases over 25 patients (10 with 3 cases, 15 with 2); a patient's cases share its label.

    8 patients are positive (4 with 3 cases, 4 with 2): 20 of 60 cases, a third.
    """
    rng = np.random.default_rng(seed)
    patients = [i % n_patients for i in range(n_cases)]
    rng.shuffle(patients)
    positive = {0, 3, 6, 9, 12, 15, 18, 21}
    cases = [
        Case(f"c{i:02d}", Path(f"/nowhere/c{i:02d}.nii.gz"), label=int(p in positive), patient_id=f"P{p:02d}")
        for i, p in enumerate(patients)
    ]
    return CaseSet(cases, ["neg", "pos"])


def splits_of(case_set: CaseSet) -> dict[str, str]:
    return {c.case_id: c.split for c in case_set.cases}


def test_split_is_deterministic_by_seed():
    base = cohort()
    first = splits_of(assign_splits(base, 0.2, 0.2, seed=3))
    assert splits_of(assign_splits(base, 0.2, 0.2, seed=3)) == first
    assert splits_of(assign_splits(cohort(), 0.2, 0.2, seed=3)) == first
    assert splits_of(assign_splits(base, 0.2, 0.2, seed=4)) != first
    assert all(c.split is None for c in base.cases), "assign_splits must not change its input"


FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_grouped_by_patient_and_about_stratified(seed):
    cases = assign_splits(cohort(), val_fraction=0.2, test_fraction=0.2, seed=seed).cases
    assert all(c.split in FRACTIONS for c in cases)
    patient_splits: dict[str, set[str]] = {}
    for c in cases:
        patient_splits.setdefault(c.patient_id, set()).add(c.split)
    assert all(len(s) == 1 for s in patient_splits.values()), "a patient is in two splits"

    overall = np.mean([c.label for c in cases])
    for split, fraction in FRACTIONS.items():
        labels = [c.label for c in cases if c.split == split]
        # Sizes: whole patients (2-3 cases) move, so a split may miss its share by one patient.
        assert abs(len(labels) - fraction * len(cases)) <= 3, (split, len(labels))
        # Positives also move in whole patients of 2 or 3 cases, so the nearest reachable positive
        # count can be off the split's share by up to 2 cases; more means it was not stratified.
        assert abs(sum(labels) - overall * len(labels)) <= 2, (split, sum(labels), len(labels))


@pytest.mark.parametrize("seed", range(5))
def test_a_small_cohort_keeps_both_classes_in_val_and_test(seed):
    """The quick demo's shape: 24 single-case patients, 5 positive, 15% val and test. Shares are
    rounded per class (negatives 19 -> 13/3/3, positives 5 -> 3/1/1), not left to the order of the
    deal, which gave the test split no positive."""
    cases = [Case(f"c{i:02d}", Path(f"/nowhere/c{i:02d}.nii.gz"), label=int(i < 5)) for i in range(24)]
    split = assign_splits(CaseSet(cases, ["neg", "pos"]), 0.15, 0.15, seed=seed).cases
    for name, (total, positives) in {"train": (16, 3), "val": (4, 1), "test": (4, 1)}.items():
        labels = [c.label for c in split if c.split == name]
        assert (len(labels), sum(labels)) == (total, positives), name


def test_split_is_more_stratified_than_a_plain_patient_split():
    """Over ten seeds the test split's positive fraction stays much closer to the cohort's than with
    sklearn's unstratified GroupShuffleSplit of the same size (mean miss about 0.05 against 0.18)."""
    base = cohort()
    labels = np.array([c.label for c in base.cases])
    groups = np.array([c.patient_id for c in base.cases])
    ours, plain = [], []
    for seed in range(10):
        split = assign_splits(base, 0.2, 0.2, seed=seed).cases
        ours.append(abs(np.mean([c.label for c in split if c.split == "test"]) - labels.mean()))
        _, test = next(GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(labels, labels, groups))
        plain.append(abs(labels[test].mean() - labels.mean()))
    assert np.mean(ours) < 0.5 * np.mean(plain), (np.mean(ours), np.mean(plain))


def test_existing_splits_are_kept_and_problem_cases_get_none():
    base = cohort()
    cases = list(base.cases)
    cases[0] = Case(cases[0].case_id, cases[0].image, label=0, split="test", patient_id="PX")
    cases[1] = Case(cases[1].case_id, cases[1].image, label=1, split="val", patient_id="PY")
    cases[2] = Case(cases[2].case_id, cases[2].image, label=1, problem="line 4: file not found: x")
    result = assign_splits(CaseSet(cases, base.classes), 0.2, 0.2, seed=0).cases
    assert result[0].split == "test" and result[1].split == "val"
    assert result[2].split is None
    assert {c.split for c in result[3:]} == {"train", "val", "test"}


def test_manifest_without_split_column_gets_a_patient_split(tmp_path, make_ct):
    folder = tmp_path / "data"
    make_ct(folder / "ct.nii.gz")
    rows = [f"c{i},ct.nii.gz,{int(i % 3 == 0)},P{i // 2}" for i in range(20)]
    path = write_manifest(folder, "case_id,image,label,patient_id\n" + "\n".join(rows) + "\n")
    case_set = assign_splits(read_manifest(path), 0.2, 0.2, seed=0)
    splits = Counter(c.split for c in case_set.cases)
    assert set(splits) == {"train", "val", "test"} and sum(splits.values()) == 20
    for i in range(0, 20, 2):
        assert case_set.cases[i].split == case_set.cases[i + 1].split  # same patient


# ---------------------------------------------------------------------------------------------
# Folder discovery


def write_dicom_series(
    folder: Path,
    array: np.ndarray,
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1.42",
) -> Path:
    """Write a (z, y, x) int16 array as a CT DICOM series, one file per slice, in reverse order."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    n = array.shape[0]
    for k in range(n):
        image = sitk.GetImageFromArray(np.ascontiguousarray(array[k]))
        image.SetSpacing(spacing[:2])
        tags = {
            "0010|0020": "PATIENT1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.7",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0032": f"{origin[0]}\\{origin[1]}\\{origin[2] + k * spacing[2]}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0060": "CT",
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",  # row spacing (y) \ column spacing (x)
            "0018|0050": str(spacing[2]),
            "0020|0013": str(k + 1),
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{n - k:04d}.dcm"))  # file names run against z
        writer.Execute(image)
    return folder


def test_dicom_series_reads_back_with_its_geometry(tmp_path):
    array = (np.arange(6 * 10 * 8).reshape(6, 10, 8) % 500 - 200).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", array)
    volume = read_volume(folder)
    assert volume.shape == (8, 10, 6)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    z = [volume.image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(6)]
    np.testing.assert_allclose(z, 30.0 + 2.5 * np.arange(6), atol=1e-6)
    np.testing.assert_array_equal(volume.array, array.transpose(2, 1, 0))
    assert volume.axcodes == ("L", "P", "S")  # DICOM's LPS patient axes, seen in RAS+


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    """ITK only warns about uneven slices and reads them onto a uniform grid: io refuses them."""
    array = (np.arange(6 * 10 * 8).reshape(6, 10, 8) % 500 - 200).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", array)
    assert read_volume(folder).spacing == pytest.approx((0.7, 0.8, 2.5))  # complete: reads as before
    (folder / "IM0003.dcm").unlink()  # the slice at z = 37.5 (file names run against z)
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    assert info.value.path == str(folder)
    assert str(info.value).startswith(f"{folder}: DICOM series slice positions are not evenly spaced: ")
    assert "a gap of 5.0 mm at z = 35.0 to 40.0 mm (IM0004.dcm, IM0002.dcm) against 2.5 mm elsewhere" in str(
        info.value
    )
    assert str(info.value).endswith("(missing slice?)")


def test_a_truncated_dicom_slice_is_named_beside_the_gap_it_leaves(tmp_path):
    """GDCM leaves a truncated slice out of its series; the gap's error names that file."""
    array = (np.arange(6 * 10 * 8).reshape(6, 10, 8) % 500 - 200).astype(np.int16)
    folder = write_dicom_series(tmp_path / "series", array)
    damaged = folder / "IM0003.dcm"
    os.truncate(damaged, damaged.stat().st_size - 100)
    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    assert "(missing slice?); not readable as part of any series: IM0003.dcm (truncated or damaged?)" in str(
        info.value
    )


@pytest.mark.parametrize("as_folder", [True, False], ids=["series-folder", "file"])
def test_a_lone_dicom_slice_keeps_its_slice_thickness(tmp_path, as_folder):
    array = (np.arange(10 * 8).reshape(1, 10, 8) % 500 - 200).astype(np.int16)
    folder = write_dicom_series(tmp_path / "one", array, spacing=(0.7, 0.8, 3.0))
    volume = read_volume(folder if as_folder else folder / "IM0001.dcm", allow_2d=True)
    assert volume.shape == (8, 10, 1) and volume.spacing == pytest.approx((0.7, 0.8, 3.0))


@pytest.mark.parametrize(
    ("z", "reason"),
    [
        ([0, 2.5, 5, 7.5], None),
        (list(np.round(np.arange(40) * 0.625, 2)), None),  # two-decimal positions: within the floor
        ([0, 2.5], None),
        ([7.5], None),  # a single slice
        (None, None),  # tags missing: nothing to check
        ([0, -2.5, -5, -10, -12.5], r"a gap of 5\.0 mm at z = -5\.0 to -10\.0 mm .*\(missing slice\?\)"),
        ([0, 2.5, 5, 12.5, 15], r"a gap of 7\.5 mm .*\(2 missing slices\?\)"),
        ([0, 2.5, 2.5, 5, 7.5], r"two slices at z = 2\.5 mm .*\(duplicate slice\?\)"),
        ([1, 1, 1], r"2 of 2 slice gaps are zero"),
        ([0, 2.5, 5, 6.5, 9.5, 12], r"a gap of 1\.5 mm .*\(misplaced slice\?\); 1 more uneven gap$"),
    ],
)
def test_slice_spacing_check(z, reason):
    files = tuple(f"IM{k}.dcm" for k in range(len(z or [])))
    positions = None if z is None else np.asarray(z, dtype=float)
    if reason is None:
        check_slice_spacing(Path("series"), files, positions)
        return
    with pytest.raises(
        VolumeError, match=r"^series: DICOM series slice positions are not evenly spaced: .*" + reason
    ):
        check_slice_spacing(Path("series"), files, positions)


def test_discover_folder_finds_every_image_kind(tmp_path, make_ct):
    root = tmp_path / "scans"
    make_ct(root / "a.nii")
    make_ct(root / "b.nii.gz")
    make_ct(root / "nested" / "c.nii.gz")
    make_ct(root / "nested" / "deeper" / "c.nii.gz")
    image = sitk.GetImageFromArray(np.zeros((6, 8, 10), np.int16))
    sitk.WriteImage(image, str(root / "d.nrrd"))
    sitk.WriteImage(image, str(root / "nested" / "e.mha"))
    write_dicom_series(root / "patient7" / "ct", np.zeros((4, 8, 8), np.int16))
    junk = root / "patient8" / "junk.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not dicom at all " * 30)
    for side in ("labels.csv", "meta.json", "notes.txt", "nested/readme.txt"):
        (root / side).write_text("side file\n")

    case_set = discover_folder(root)
    cases = by_id(case_set)
    assert sorted(cases) == [
        "a",
        "b",
        "d",
        "nested__c",
        "nested__deeper__c",
        "nested__e",
        "patient7__ct",
        "patient8__junk.dcm",
    ]
    assert cases["a"].image == (root / "a.nii").resolve()
    assert cases["nested__deeper__c"].image == (root / "nested" / "deeper" / "c.nii.gz").resolve()
    assert cases["patient7__ct"].image == (root / "patient7" / "ct").resolve()
    assert cases["patient7__ct"].series_uid == "1.2.826.0.1.3680043.2.1125.1.42"
    junk = cases["patient8__junk.dcm"]
    assert junk.problem == f"{junk.image}: not a recognised image file or DICOM series"
    assert [cid for cid, c in cases.items() if c.problem] == ["patient8__junk.dcm"]
    assert all(c.label is None for c in case_set.cases)
    # Stable: the same folder gives the same ids in the same order.
    assert [c.case_id for c in discover_folder(root).cases] == [c.case_id for c in case_set.cases]
    series = read_volume(cases["patient7__ct"].image, series_uid=cases["patient7__ct"].series_uid)
    assert series.shape == (8, 8, 4)


def test_discover_folder_with_only_side_files_is_an_error(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "notes.txt").write_text("nothing\n")
    with pytest.raises(ManifestError, match="no images found"):
        discover_folder(root)
    with pytest.raises(ManifestError, match="input folder not found"):
        discover_folder(tmp_path / "absent")


def test_discover_folder_turns_colliding_case_ids_into_error_cases(tmp_path, make_ct):
    root = tmp_path / "scans"
    for name in ("x.nii", "x.nii.gz", "y.nii.gz"):
        make_ct(root / name)
    cases = by_id(discover_folder(root))
    assert set(cases) == {"x.nii", "x.nii.gz", "y"}
    assert cases["y"].problem is None
    first, second = root / "x.nii", root / "x.nii.gz"
    assert cases["x.nii"].problem == f"{first}: {second} gives the same case id 'x'; rename one of them"
    assert cases["x.nii.gz"].problem == f"{second}: {first} gives the same case id 'x'; rename one of them"


def test_case_ids_that_differ_only_in_letter_case_are_a_clash(tmp_path, make_ct):
    """On macOS or Windows A.npz and a.npz would be one cache file, so neither case is kept."""
    root = tmp_path / "scans"
    for name in ("Scan1.nii.gz", "scan1.nii.gz", "y.nii.gz"):
        make_ct(root / name)
    cases = by_id(discover_folder(root))
    assert set(cases) == {"Scan1.nii.gz", "scan1.nii.gz", "y"} and cases["y"].problem is None
    assert cases["scan1.nii.gz"].problem == (
        f"{root / 'scan1.nii.gz'}: {root / 'Scan1.nii.gz'} gives a case id that differs only in letter case "
        "from 'scan1'; rename one of them"
    )


def test_a_clash_between_a_subfolder_and_a_joined_name_leaves_the_folder_usable(tmp_path, make_ct):
    root = tmp_path / "scans"
    for name in ("sub/x.nii.gz", "sub__x.nii.gz", "y.nii.gz"):
        make_ct(root / name)
    cases = by_id(discover_folder(root))
    assert set(cases) == {"sub/x.nii.gz", "sub__x.nii.gz", "y"} and cases["y"].problem is None
    assert "gives the same case id 'sub__x'" in cases["sub/x.nii.gz"].problem


def test_discover_folder_reads_each_real_folder_once_skips_hidden_ones_and_names_broken_links(
    tmp_path, make_ct
):
    root = tmp_path / "scans"
    make_ct(root / "real" / "inner" / "a.nii.gz")
    make_ct(root / ".snapshot" / "real" / "inner" / "a.nii.gz")  # storage snapshots of the same scans
    make_ct(tmp_path / "elsewhere" / "b.nii.gz")
    (root / "link_to_real").symlink_to(root / "real")  # the same scans a second way
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # scans kept outside the tree
    (root / "gone.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    (root / "alias.nii.gz").symlink_to(root / "real" / "inner" / "a.nii.gz")  # a file's second way in
    cases = by_id(discover_folder(root))
    assert set(cases) == {"real__inner__a", "linked__b", "gone", "alias"}
    assert cases["real__inner__a"].problem is None
    scan = root / "real" / "inner" / "a.nii.gz"
    assert cases["alias"].problem == f"{root / 'alias.nii.gz'}: the same file as {scan}; read once, as that"
    assert cases["gone"].problem == f"{root / 'gone.nii.gz'}: a broken symbolic link (its target " + (
        f"{tmp_path / 'deleted.nii.gz'} is gone)"
    )


def test_special_files_and_link_loops_get_rows_and_keep_a_dicom_scan_away(tmp_path, make_ct):
    root = tmp_path / "scans"
    make_ct(root / "good.nii.gz")
    os.mkfifo(root / "pipe.nii.gz")  # a reader would block on it for ever
    (root / "loop.nii.gz").symlink_to(root / "loop.nii.gz")
    dicom = root / "series"
    dicom.mkdir()
    os.mkfifo(dicom / "stream")
    (dicom / "IM0001").write_bytes(b"not really DICOM")
    cases = by_id(discover_folder(root))
    assert cases["good"].problem is None
    assert cases["pipe"].problem == f"{root / 'pipe.nii.gz'}: not a regular file (a FIFO, socket or device)"
    assert cases["loop"].problem.startswith(f"{root / 'loop.nii.gz'}: cannot be read (Too many levels")
    assert "not a regular file" in cases["series__stream"].problem
    assert "not read: its folder also holds a FIFO" in cases["series__IM0001"].problem


def test_prediction_inputs_name_their_manifest_and_refuse_a_missing_path(data, tmp_path):
    from pipeline.manifest import input_cases

    path = write_manifest(data, "case_id,image\na,images/a.nii.gz\nghost,images/ghost.nii.gz\n", "new.csv")
    cases = {c.case_id: c for c in input_cases(path)}
    assert cases["a"].problem is None
    assert cases["ghost"].problem == f"{path}: line 3: file not found: images/ghost.nii.gz"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.nii\.gz: no such file or folder"):
        input_cases(tmp_path / "nowhere.nii.gz")


def test_manifest_series_uid_and_an_output_folder_inside_the_input(data, tmp_path):
    from pipeline.manifest import input_cases

    path = write_manifest(data, "case_id,image,series_uid\na,images/a.nii.gz,1.2.3\nb,images/b.nii.gz,\n")
    cases = by_id(read_manifest(path))
    assert cases["a"].series_uid == "1.2.3" and cases["b"].series_uid is None
    own = data / "images" / "pred" / "masks"  # predict --input data/images --out data/images/pred
    own.mkdir(parents=True)
    (own / "a.nii.gz").write_bytes((data / "images" / "a.nii.gz").read_bytes())
    assert sorted(c.case_id for c in input_cases(data / "images")) == ["a", "b", "c", "pred__masks__a"]
    assert sorted(c.case_id for c in input_cases(data / "images", data / "images" / "pred")) == [
        "a",
        "b",
        "c",
    ]


def test_float_and_missing_value_labels_read_as_integers_and_empty(data):
    """A label column exported by pandas or R ("1.0", "NaN", "NA") must not invent classes."""
    text = "case_id,image,label\na,images/a.nii.gz,0.0\nb,images/b.nii.gz,1\nc,images/c.nii.gz,NaN\n"
    case_set = read_manifest(write_manifest(data, text))
    assert case_set.classes == ["0", "1"] and case_set.problems == []
    assert [c.label for c in case_set.cases] == [0, 1, None]
    declared = read_manifest(write_manifest(data, text.replace("NaN", "NA")), classes=["normal", "mass"])
    assert [c.label for c in declared.cases] == [0, 1, None] and declared.problems == []


def test_case_id_that_is_a_path_is_refused(data):
    """A case id names masks/<case_id>.nii.gz and cache/<case_id>.npz: '../x' would write elsewhere."""
    text = "case_id,image\n../x,images/a.nii.gz\np/1,images/b.nii.gz\nc,images/c.nii.gz\n"
    with pytest.raises(ManifestError, match=r"line 2: case_id '\.\./x' is not a plain file name") as err:
        read_manifest(write_manifest(data, text))
    assert "line 3: case_id 'p/1'" in str(err.value)


def test_extra_fields_and_repeated_columns_are_refused(data):
    """A value past the header's columns (an unquoted comma) or a column given twice is not dropped."""
    extra = "case_id,image,label\na,images/a.nii.gz,normal,mass\n"
    with pytest.raises(ManifestError, match="line 2: 4 fields, the header has 3"):
        read_manifest(write_manifest(data, extra))
    repeated = "case_id,image,label,label\na,images/a.nii.gz,normal,mass\n"
    with pytest.raises(ManifestError, match="column 'label' appears 2 times"):
        read_manifest(write_manifest(data, repeated))
    trailing = "case_id,image,label\na,images/a.nii.gz,normal,\n"  # an empty extra field is harmless
    assert read_manifest(write_manifest(data, trailing)).cases[0].label == 0


def test_a_stray_label_among_integers_is_that_rows_error_not_a_class(data):
    text = "case_id,image,label\na,images/a.nii.gz,0\nb,images/b.nii.gz,1\nc,images/c.nii.gz,0.5\n"
    case_set = read_manifest(write_manifest(data, text))
    assert case_set.classes == ["0", "1"]
    assert [c.label for c in case_set.cases] == [0, 1, None]
    assert case_set.problems == ["c: line 4: label '0.5' is not one of the classes ['0', '1']"]


def test_file_names_in_the_label_column_are_read_as_no_label_with_a_warning(data, capsys):
    text = "case_id,image,label\na,images/a.nii.gz,masks/a.nii.gz\nb,images/b.nii.gz,masks/b.nii.gz\n"
    case_set = read_manifest(write_manifest(data, text))
    assert [c.label for c in case_set.cases] == [None, None] and case_set.problems == []
    assert (
        "line 2: label 'masks/a.nii.gz' is a file name (2 such), read as no label" in capsys.readouterr().err
    )


def test_plus_and_minus_one_labels_are_two_integer_classes(data):
    text = "case_id,image,label\na,images/a.nii.gz,-1\nb,images/b.nii.gz,+1\nc,images/c.nii.gz,-1\n"
    case_set = read_manifest(write_manifest(data, text))
    assert case_set.classes == ["-1", "1"] and [c.label for c in case_set.cases] == [0, 1, 0]
