"""Lung segmentation: slice preprocessing, post-processing, training, prediction and evaluation.

Training, prediction and evaluation use small ``pipeline.synth`` phantoms on RAS, LPS and oblique
grids. The unit tests of the slice preprocessing and post-processing use a simpler phantom drawn here
in world (RAS+ mm) coordinates: a 40 HU elliptic body, a larger right lung (x > 0) and a left lung of
-850 HU with a few vessels, a table under the patient and -2048 padding outside the field of view.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.batch import Row
from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.cli import main
from pipeline.config import Config
from pipeline.evaluate.segmentation import case_metrics, run_evaluate_segment
from pipeline.infer.segment import _volume_row, load_segmenter, run_predict_segment, segment_volume
from pipeline.io import read_volume
from pipeline.manifest import Case
from pipeline.preprocess.stage import load_cases
from pipeline.segment.postprocess import LEFT, RIGHT, lung_volumes, postprocess
from pipeline.segment.slices import SliceParams, crop_resize, prepare_slices, restore_slices
from pipeline.synth import generate_case, write_cohort
from pipeline.train.segment import axial_stack, load_slices, predict_slices, run_train_segment, segment_cases

SHAPE = (64, 64, 12)
SPACING = (5.0, 5.0, 10.0)


def rotation(degrees_z: float = 0.0, degrees_x: float = 0.0) -> np.ndarray:
    """A rotation about z, then about x."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rx @ rz


def grid_affine(directions: np.ndarray, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """A voxel-to-RAS affine with these direction cosines whose grid is centred on the origin."""
    affine = np.eye(4)
    affine[:3, :3] = directions @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def phantom(affine: np.ndarray, shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, mask uint8 with 1 = right lung, 2 = left lung) sampled on the affine's grid."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(float)
    x, y, z = np.moveaxis(idx @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    scale = 1 + 0.08 * rng.standard_normal(3)
    image = np.full(shape, -1000.0)
    image[x**2 + y**2 > 150**2] = -2048  # outside the field of view
    image[(np.abs(x) < 120) & (y > -125) & (y < -115)] = 200  # the table
    image[(x / 135 / scale[0]) ** 2 + (y / 95) ** 2 < 1] = 40
    right = ((x - 58) / 42 / scale[1]) ** 2 + (y / 65) ** 2 + (z / 48) ** 2 < 1
    left = ((x + 60) / 36 / scale[2]) ** 2 + (y / 62) ** 2 + (z / 44) ** 2 < 1
    image[right | left] = -850
    for _ in range(4):  # vessels inside the lungs are lung in the mask
        cx, cy = rng.choice([-60, 58]) + rng.uniform(-15, 15), rng.uniform(-30, 30)
        image[((x - cx) ** 2 + (y - cy) ** 2 < 8**2) & (right | left)] = 30
    image += rng.normal(0, 20, shape)
    mask = np.zeros(shape, np.uint8)
    mask[right], mask[left] = RIGHT, LEFT
    return image.astype(np.int16), mask


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def synth_case(seed: int, orientation: str = "LPS", oblique: bool = False):
    """A small pipeline.synth phantom: 64² in-plane, 16 slices."""
    return generate_case(seed, positive=False, size=64, depth=16, orientation=orientation, oblique=oblique)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Seven synthetic cases on RAS, LPS and oblique grids, with a manifest: 5 train, 1 val, 1 test."""
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    for n in range(7):
        case = synth_case(n, ("RAS", "LPS", "LPS")[n % 3], oblique=n % 3 == 2)
        save(root / "images" / f"c{n}.nii.gz", case.image, case.affine)
        save(root / "masks" / f"c{n}.nii.gz", case.mask, case.affine)
        split = "val" if n == 5 else "test" if n == 6 else "train"
        rows.append(f"c{n},images/c{n}.nii.gz,masks/c{n}.nii.gz,{split}")
    (root / "manifest.csv").write_text("case_id,image,mask,split\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads contend badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory) -> Config:
    """A small U-Net trained briefly on the phantom cohort, validated and saved as an EMA."""
    config = Config.model_validate(
        {
            "run": str(tmp_path_factory.mktemp("run")),
            "data": {"manifest": str(cohort)},
            "segment": {
                "size": 64,
                "channels": [8, 16, 32, 64],
                "num_res_units": 1,
                "epochs": 25,
                "batch_size": 8,
                "lr": 0.005,
                "patience": None,
                "ema_decay": 0.9,
                "infer_batch": 16,
            },
        }
    )
    run_train_segment(config)
    return config


# --- slices -------------------------------------------------------------------------------------


def test_prepare_neutralises_padding_and_restores_the_grid():
    affine = grid_affine(np.diag([-1.0, -1.0, 1.0]))
    image, mask = phantom(affine)
    stack, truth = image.transpose(2, 0, 1), mask.transpose(2, 0, 1) > 0
    params = SliceParams(size=96)
    prepared = prepare_slices(stack, params)
    assert prepared.images.shape == (SHAPE[2], 1, 96, 96)
    assert float(prepared.images.min()) >= 0 and float(prepared.images.max()) <= 1
    assert not prepared.body[:, 0, 0].any()  # the corner (padding) is outside the body
    assert prepared.body[:, 32, 32].all()
    # the table (200 HU) is not part of the body: after neutralising it is air in the net input
    assert not prepared.body[6, 32, 57]
    resized = crop_resize(truth, prepared.boxes, 96, 0, mode="nearest-exact")
    restored = restore_slices(resized * 2.0 - 1.0, prepared.boxes, stack.shape[1:])
    assert restored.shape == truth.shape
    assert dice(restored, truth) > 0.97


def test_non_square_pixels_keep_the_anatomy_round_in_the_net_input():
    """A body round in mm on 1 x 2 mm pixels (a coronal acquisition's axial slices) must reach the
    net round, as on square pixels, and its scores must come back onto the original pixels."""
    rows, cols = np.mgrid[:140, :70]
    body = (rows - 70.0) ** 2 + ((cols - 35.0) * 2) ** 2 < 50.0**2  # radius 50 mm
    stack = np.where(body, 40.0, -1000.0)[None]
    prepared = prepare_slices(stack, SliceParams(size=64), pixel_mm=(1.0, 2.0))
    seen = prepared.images[0, 0].numpy() > 0.5
    height, width = np.flatnonzero(seen.any(axis=1)).size, np.flatnonzero(seen.any(axis=0)).size
    assert abs(height - width) <= 2, (height, width)
    resized = crop_resize(body[None], prepared.boxes, 64, 0, mode="nearest-exact")
    restored = restore_slices(resized * 2.0 - 1.0, prepared.boxes, stack.shape[1:])
    assert dice(restored, body[None]) > 0.97


def test_training_labels_outside_the_body_are_dropped(tmp_path):
    affine = grid_affine(np.diag([-1.0, -1.0, 1.0]))
    image, mask = phantom(affine)
    planted = mask.copy()
    planted[:6, :6] = 1  # air in the corner mislabelled as lung, as in a few kmader masks
    case = Case("c", save(tmp_path / "i.nii.gz", image, affine), save(tmp_path / "m.nii.gz", planted, affine))
    slices = load_slices([case], SliceParams(size=64))
    clean = load_slices(
        [Case("c", case.image, save(tmp_path / "t.nii.gz", mask, affine))], SliceParams(size=64)
    )
    assert torch.equal(slices.masks, clean.masks) and slices.masks.sum() > 0
    assert ((slices.masks > 0) & (slices.masks < 1)).any()  # soft: boundary pixels hold a lung fraction


# --- post-processing ----------------------------------------------------------------------------


def test_postprocess_removes_outside_body_component_and_labels_sides():
    affine = grid_affine(np.eye(3))  # RAS: i runs to the patient's right
    _, mask = phantom(affine)
    body = np.zeros(SHAPE, bool)
    body[4:60, 8:56] = True
    planted = mask.copy()
    planted[0:3, 0:3, 4:8] = 1  # a blob in the air outside the body
    planted[20, 32, 6] = 0  # a one-voxel hole inside the left lung
    labels = postprocess(planted, affine, body)
    assert labels[0:3, 0:3].sum() == 0
    assert labels[20, 32, 6] == LEFT
    assert np.array_equal(labels > 0, mask > 0)
    assert (labels[mask == RIGHT] == RIGHT).all() and (labels[mask == LEFT] == LEFT).all()


def test_postprocess_drops_soft_tissue_component_larger_than_the_lungs():
    affine = grid_affine(np.eye(3))
    image, mask = phantom(affine)
    planted = mask.copy()
    wall = np.zeros(SHAPE, bool)
    wall[5:59, 47:60] = True  # in front of the lungs, clear of them, larger than either
    image[wall] = 40  # soft tissue
    assert wall.sum() > max((mask == RIGHT).sum(), (mask == LEFT).sum()) and not (mask[:, 46:] > 0).any()
    planted[wall] = 1
    fooled = postprocess(planted, affine, image=image, min_aerated=0.0)
    assert fooled[wall].all()  # without the guard the block is kept and a lung is lost
    labels = postprocess(planted, affine, image=image)
    assert np.array_equal(labels > 0, mask > 0)


def test_postprocess_keeps_largest_components_and_splits_fused_lungs():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros((40, 20, 10), np.uint8)
    mask[2:38, 5:15, 2:8] = 1  # one slab across the midline: fused lungs
    mask[10:12, 18:20, 0:2] = 1  # a small third component
    labels = postprocess(mask, affine, keep=1)
    assert labels[10:12, 18:20, 0:2].sum() == 0
    assert (labels[2:20, 5:15, 2:8] == LEFT).all() and (labels[20:38, 5:15, 2:8] == RIGHT).all()


def test_postprocess_fills_small_holes_in_every_slice_but_not_large_ones():
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    solid = np.zeros((30, 30, 40), np.uint8)
    solid[5:25, 5:25] = 1
    expected = solid.copy()
    expected[8:22, 8:22, 20:25] = 0  # 196 mm² per slice: larger than max_hole_mm2, kept
    expected[5:10, 14:16, :] = 0  # a notch open to the outside of every slice: not a hole
    mask = expected.copy()
    for k in (0, 15, 16, 31, 39):  # small holes on both sides of the labelling's 16-slice slabs
        mask[12 : 12 + k % 3 + 1, 17:19, k] = 0
    labels = postprocess(mask, affine, keep=1, max_hole_mm2=150.0, label_sides=False)
    assert (mask != expected).sum() > 0
    assert np.array_equal(labels, expected)


def test_lung_volume_is_voxel_count_times_voxel_volume():
    affine = grid_affine(rotation(20, 0), spacing=(0.7, 0.8, 2.5))
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:25, 10:40, 2:9] = RIGHT
    labels[35:60, 10:40, 2:10] = LEFT
    volumes = lung_volumes(labels, affine)
    voxel_ml = 0.7 * 0.8 * 2.5 / 1000
    assert volumes["right_ml"] == pytest.approx(20 * 30 * 7 * voxel_ml)
    assert volumes["left_ml"] == pytest.approx(25 * 30 * 8 * voxel_ml)
    assert volumes["total_ml"] == pytest.approx(volumes["right_ml"] + volumes["left_ml"])


# --- training, prediction, evaluation -----------------------------------------------------------


def test_volumes_table_leaves_unmeasured_sides_empty():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    row = _volume_row(Row("c", "ok", extra=lung_volumes(labels, np.diag([2.0, 2.0, 2.0, 1.0]), sides=False)))
    assert row == {"right_ml": "", "left_ml": "", "total_ml": "0.256", "status": "ok", "reason": ""}


def test_training_writes_the_run_folder(trained):
    out = trained.run_dir / "segment"
    for name in ("checkpoint.pt", "checkpoint.json", "history.csv", "config.yaml", "splits.csv"):
        assert (out / name).is_file()
    assert any((out / "tb").iterdir())
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["slice_params"]["size"] == 64 and meta["val_metrics"]["dice"] > 0.9
    assert meta["loop"]["ema_decay"] == 0.9  # the checkpoint holds the EMA weights


def test_training_without_train_cases_says_so_and_writes_nothing(cohort, tmp_path):
    manifest = tmp_path / "manifest.csv"
    lines = cohort.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], *(ln.replace(",train", ",val") for ln in lines[1:])]) + "\n")
    for ln in lines[1:]:  # the images and masks beside the copy
        for rel in ln.split(",")[1:3]:
            (tmp_path / rel).parent.mkdir(exist_ok=True)
            shutil.copy(cohort.parent / rel, tmp_path / rel)
    config = Config.model_validate({"run": str(tmp_path / "run"), "data": {"manifest": str(manifest)}})
    with pytest.raises(ValueError, match=r"manifest\.csv: segment training needs train cases"):
        run_train_segment(config)
    assert not (tmp_path / "run" / "segment").exists()


@pytest.mark.parametrize(("orientation", "oblique"), [("RAS", False), ("LPS", False), ("LPS", True)])
def test_prediction_keeps_the_input_grid_and_finds_the_lungs(trained, tmp_path, orientation, oblique):
    case = synth_case(100, orientation, oblique)
    scan = save(tmp_path / "in" / "scan.nii.gz", case.image, case.affine)
    out = run_predict_segment(trained.run_dir / "segment", scan, tmp_path / "out")
    written = nib.load(out / "masks" / "scan.nii.gz")
    source = nib.load(scan)
    assert written.shape == source.shape
    assert np.allclose(written.affine, source.affine)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    assert written.header.get_sform(coded=True)[1] == source.header.get_sform(coded=True)[1]
    labels, truth = np.asarray(written.dataobj), case.mask
    assert dice(labels, truth) > 0.9
    assert dice(labels == RIGHT, truth == RIGHT) > 0.85 and dice(labels == LEFT, truth == LEFT) > 0.85
    rows = list(csv.DictReader((out / "volumes.csv").open()))
    assert rows[0]["status"] == "ok"
    voxel_ml = abs(np.linalg.det(case.affine[:3, :3])) / 1000
    assert float(rows[0]["right_ml"]) == pytest.approx((labels == RIGHT).sum() * voxel_ml, abs=1e-3)


def test_bfloat16_inference_matches_float32(trained):
    segmenter = load_segmenter(trained.run_dir / "segment")
    case = synth_case(300)
    stack = np.ascontiguousarray(axial_stack(case.image, case.affine))
    images = prepare_slices(stack, segmenter.params).images
    full, half = (predict_slices(segmenter.model, images, 8, p) for p in ("float32", "bfloat16"))
    assert half.dtype == torch.float32 and (full > 0).sum() > 1000
    assert not torch.equal(full, half)  # bfloat16 really ran
    assert ((full > 0) == (half > 0)).float().mean() > 0.995


def test_flip_tta_is_the_mean_over_the_slice_and_its_mirror(trained):
    segmenter = load_segmenter(trained.run_dir / "segment")
    case = synth_case(300)
    stack = np.ascontiguousarray(axial_stack(case.image, case.affine))
    images = prepare_slices(stack, segmenter.params).images
    plain = predict_slices(segmenter.model, images, 8)
    mirrored = predict_slices(segmenter.model, images.flip(-2), 8).flip(-2)
    tta = predict_slices(segmenter.model, images, 8, flip=True)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the net is not mirror-symmetric by itself
    torch.testing.assert_close(tta, (plain + mirrored) / 2, rtol=1e-4, atol=1e-4)
    # a left-right mirrored chest gets the mirrored scores: the flip is the L axis, undone after
    torch.testing.assert_close(predict_slices(segmenter.model, images.flip(-2), 8, flip=True), tta.flip(-2))
    assert not segmenter.settings.flip_tta  # off by default
    assert load_segmenter(trained.run_dir / "segment", flip_tta=True).settings.flip_tta


def test_predict_cli_flip_tta_writes_the_averaged_mask(trained, tmp_path):
    case = synth_case(101)
    scan = save(tmp_path / "in" / "scan.nii.gz", case.image, case.affine)
    model = trained.run_dir / "segment"
    argv = ["predict", "segment", "--model", str(model), "--input", str(scan)]
    assert main([*argv, "--out", str(tmp_path / "tta"), "--flip-tta"]) == 0
    labels = np.asarray(nib.load(tmp_path / "tta" / "masks" / "scan.nii.gz").dataobj)
    expected = segment_volume(load_segmenter(model, flip_tta=True), read_volume(scan))
    np.testing.assert_array_equal(labels, expected)
    plain = segment_volume(load_segmenter(model, flip_tta=False), read_volume(scan))
    assert (labels != plain).any()  # the flag took effect
    assert dice(labels, case.mask) > 0.9
    classify = ["predict", "classify", "--model", str(model), "--input", str(scan), "--out", str(tmp_path)]
    assert main([*classify, "--flip-tta"]) == 2  # a segment-only option


def test_predict_cli_reads_a_4d_scan_and_nan_voxels_when_told_to(trained, tmp_path):
    case = synth_case(102)
    with_nan = case.image.astype(np.float32)
    with_nan[0, 0, 0] = np.nan
    folder = tmp_path / "in"
    save(folder / "series.nii.gz", np.stack([case.image, case.image + 5], axis=-1), case.affine)
    save(folder / "nan.nii.gz", with_nan, case.affine)
    argv = ["predict", "segment", "--model", str(trained.run_dir / "segment"), "--input", str(folder)]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 1  # both refused, saying how to read them
    reasons = {r["case_id"]: r["reason"] for r in csv.DictReader((tmp_path / "plain" / "volumes.csv").open())}
    assert "--volume-index" in reasons["series"] and "--nonfinite zero" in reasons["nan"]
    assert main([*argv, "--out", str(tmp_path / "told"), "--volume-index", "1", "--nonfinite", "zero"]) == 0
    mask = nib.load(tmp_path / "told" / "masks" / "series.nii.gz")
    assert mask.shape == case.image.shape and np.allclose(mask.affine, case.affine)
    assert dice(np.asarray(mask.dataobj), case.mask) > 0.9
    assert dice(np.asarray(nib.load(tmp_path / "told" / "masks" / "nan.nii.gz").dataobj), case.mask) > 0.9


def second_net(trained: Config, folder: Path, **slice_params: object) -> Path:
    """A copy of the trained net with perturbed weights (and optionally other slice parameters)."""
    state, meta = load_checkpoint(trained.run_dir / "segment" / "checkpoint.pt")
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if value.is_floating_point() and value.numel() > 1:
            state[key] = value + 0.05 * value.std() * torch.randn(value.shape, generator=generator)
    meta.pop("versions")
    meta["slice_params"] = {**meta["slice_params"], **slice_params}
    save_checkpoint(folder / "checkpoint.pt", state, meta)
    return folder


def test_several_models_predict_as_their_mean_probability(trained, tmp_path):
    first = trained.run_dir / "segment"
    second = second_net(trained, tmp_path / "second")
    a, b = load_segmenter(first), load_segmenter(second)
    ensemble = load_segmenter([first, second])
    assert ensemble.params == a.params and ensemble.settings == a.settings
    case = synth_case(300)
    images = prepare_slices(np.ascontiguousarray(axial_stack(case.image, case.affine)), a.params).images
    probs = [m(images).softmax(1) for m in (a.model.eval(), b.model.eval())]
    mean = (probs[0] + probs[1]) / 2
    expected = (mean[:, 1:2] / mean[:, 0:1]).log()
    scores = predict_slices(ensemble.model, images, 8)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores, predict_slices(a.model, images, 8), atol=1e-3)  # b counted

    case = synth_case(101)
    scan = save(tmp_path / "in" / "scan.nii.gz", case.image, case.affine)
    argv = ["predict", "segment", "--model", str(first), str(second), "--input", str(scan)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    labels = np.asarray(nib.load(tmp_path / "out" / "masks" / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(labels, segment_volume(ensemble, read_volume(scan)))
    repeated = ["predict", "segment", "--model", str(first), "--model", str(second), "--input", str(scan)]
    assert main([*repeated, "--out", str(tmp_path / "repeated")]) == 0
    written = np.asarray(nib.load(tmp_path / "repeated" / "masks" / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(written, labels)  # both spellings give the ensemble
    assert dice(labels, case.mask) > 0.9
    classify = ["predict", "classify", "--model", str(first), str(second), "--input", str(scan)]
    assert main([*classify, "--out", str(tmp_path / "c")]) == 2  # a segment-only option


def test_an_ensemble_refuses_nets_trained_on_other_slices(trained, tmp_path):
    other = second_net(trained, tmp_path / "other", size=96)
    with pytest.raises(ValueError, match=r"other.*slice parameters"):
        load_segmenter([trained.run_dir / "segment", other])


@pytest.mark.parametrize("two_d", [False, True], ids=["HxWx1", "HxW"])
def test_single_slice_input_gives_a_valid_mask(trained, tmp_path, two_d):
    case = synth_case(7)
    z = int(np.argmax((case.mask > 0).sum(axis=(0, 1))))
    slice_affine = case.affine.copy()
    slice_affine[:3, 3] = case.affine[:3, :3] @ [0, 0, z] + case.affine[:3, 3]
    image = case.image[:, :, z] if two_d else case.image[:, :, z : z + 1]
    scan = save(tmp_path / "slice.nii.gz", image, slice_affine)
    out = run_predict_segment(trained.run_dir / "segment", scan, tmp_path / "out")
    written = nib.load(out / "masks" / "slice.nii.gz")
    assert written.shape == image.shape and np.array_equal(written.affine, nib.load(scan).affine)
    truth = case.mask[:, :, z] if two_d else case.mask[:, :, z : z + 1]
    assert dice(np.asarray(written.dataobj), truth) > 0.9


def test_corrupt_scan_gets_an_error_row_and_the_batch_resumes(trained, tmp_path):
    folder = tmp_path / "scans"
    for n in (1, 2):
        case = synth_case(200 + n)
        save(folder / f"good{n}.nii.gz", case.image, case.affine)
    (folder / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    out = run_predict_segment(trained.run_dir / "segment", folder, tmp_path / "out")
    ledger = {r["case_id"]: r for r in csv.DictReader((out / "ledger.csv").open())}
    assert ledger["broken"]["status"] == "error" and "broken" in ledger["broken"]["reason"]
    assert ledger["good1"]["status"] == ledger["good2"]["status"] == "ok"
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["good1.nii.gz", "good2.nii.gz"]
    volumes = {r["case_id"]: r for r in csv.DictReader((out / "volumes.csv").open())}
    assert volumes["broken"]["status"] == "error" and float(volumes["good1"]["total_ml"]) > 0
    stamps = {n: (out / "masks" / f"good{n}.nii.gz").stat().st_mtime_ns for n in (1, 2)}
    run_predict_segment(trained.run_dir / "segment", folder, tmp_path / "out")  # resumes: good cases kept
    assert {n: (out / "masks" / f"good{n}.nii.gz").stat().st_mtime_ns for n in (1, 2)} == stamps
    assert len(list(csv.DictReader((out / "volumes.csv").open()))) == 3
    ledger = {r["case_id"]: r for r in csv.DictReader((out / "ledger.csv").open())}
    assert ledger["good1"]["status"] == "skipped" and ledger["broken"]["status"] == "error"
    replaced = synth_case(300)  # a different scan under the same name is redone, the other kept
    save(folder / "good2.nii.gz", replaced.image, replaced.affine)
    run_predict_segment(trained.run_dir / "segment", folder, tmp_path / "out")
    assert (out / "masks" / "good1.nii.gz").stat().st_mtime_ns == stamps[1]
    assert np.allclose(nib.load(out / "masks" / "good2.nii.gz").affine, replaced.affine)
    run_predict_segment(trained.run_dir / "segment", folder, tmp_path / "out", flip_tta=True)  # new option
    assert (out / "masks" / "good1.nii.gz").stat().st_mtime_ns != stamps[1]


def test_evaluation_writes_metrics_for_the_test_split(trained):
    out = run_evaluate_segment(trained)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cases"] == 1 and metrics["dice"]["mean"] > 0.9
    assert 0 <= metrics["hd95_mm"]["mean"] < 20
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert [r["case_id"] for r in rows] == ["c6"]


def test_case_metrics_in_mm():
    truth = np.zeros((30, 30, 1), bool)
    truth[10:20, 10:20] = True
    shifted = np.roll(truth, 2, axis=0)
    m = case_metrics(shifted, truth, (0.5, 0.5, 1.0))
    assert m["dice"] == pytest.approx(0.8)
    assert m["hd95_mm"] == pytest.approx(1.0)
    assert m["rel_volume_error"] == pytest.approx(0.0)


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_short_training_on_kmader_reaches_validation_dice(shared_data, tmp_path):
    manifest = shared_data / "kmader_lung2d" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip("kmader_lung2d not found")
    config = Config.model_validate(
        {
            "run": str(tmp_path / "run"),
            "data": {"manifest": str(manifest)},
            "segment": {"size": 128, "epochs": 4, "batch_size": 8, "patience": None},
        }
    )
    out = run_train_segment(config)
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["val_metrics"]["dice"] > 0.90


def test_segment_training_uses_the_split_preprocess_made(tmp_path):
    """With ``data.classes`` reordering the labels (as the demo does), segment's split is still
    preprocess's, so the report's split table and the segmentation test cases agree."""
    manifest = write_cohort(tmp_path / "cohort", 24, 0.3, size=48, depth=16, seed=0)
    overrides = {"data.manifest": str(manifest), "data.classes": ["normal", "lesion"]}
    config = Config.model_validate({"run": str(tmp_path / "run"), "data": {"manifest": str(manifest)}})
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"classes": overrides["data.classes"]})}
    )
    splits = {c.case_id: c.split for c in load_cases(config).cases}
    assert {c.case_id: c.split for c in segment_cases(config)} == splits
