"""The preprocess stage end to end on the real datasets in ../shared/data, with the shipped configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.preprocess.cache import load_entry
from pipeline.preprocess.intensity import DISTANCE_SCALE_MM
from pipeline.preprocess.stage import run_preprocess
from pipeline.preprocess.views import extract_views

CONFIGS = Path(__file__).resolve().parents[1] / "data_manifests"

pytestmark = pytest.mark.realdata


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_adrenalmnist3d_end_to_end(shared_data, tmp_path):
    config = load_config(CONFIGS / "adrenalmnist3d.yaml", run=tmp_path / "run", **{"preprocess.workers": 2})
    out = run_preprocess(config)
    ledger = _rows(out / "ledger.csv")
    assert len(ledger) == 1584 and {r["status"] for r in ledger} == {"ok"}
    fp = json.loads((out / "fingerprint.json").read_text())
    # Published split sizes and class counts (shared/data/adrenalmnist3d/SOURCE.md).
    assert fp["class_counts"] == {
        "train": {"normal": 929, "hyperplasia": 259},
        "val": {"normal": 76, "hyperplasia": 22},
        "test": {"normal": 229, "hyperplasia": 69},
    }
    case = next(r for r in _rows(out / "cases.csv") if r["case_id"] == "adrenalmnist3d_train_0002")
    arrays, _ = load_entry(out / case["cache"])
    assert arrays["views"].shape == (3, 56, 28, 28)  # every slice of the image, then of its distance map
    # The grid is kept (pad at native spacing, no crop): the volume is the input scaled to [0, 1],
    # then smoothed by the config's Gaussian (sigma in mm over the 2.2857 mm voxels).
    import nibabel as nib
    from scipy import ndimage

    image = nib.as_closest_canonical(nib.load(case["image"]))
    sigma = config.preprocess.intensity.smooth_mm / np.array(image.header.get_zooms()[:3])
    expected = ndimage.gaussian_filter(image.get_fdata() / 255.0, sigma, mode="nearest")
    np.testing.assert_allclose(arrays["volume"].astype(np.float64), expected, atol=1e-3)  # float16
    # The distance slabs measure the unsmoothed gland: zero outside it, half a voxel in its rim.
    gland = extract_views(image.get_fdata() > 127, mode="slab", thickness=28)
    distance_mm = arrays["views"][:, 28:] * DISTANCE_SCALE_MM
    assert np.array_equal(distance_mm > 0, gland)
    assert distance_mm[gland].min() == pytest.approx(0.5 * 2.2857, abs=1e-3)


def test_kmader_lung2d_slices_end_to_end(shared_data, tmp_path):
    config = load_config(CONFIGS / "kmader_lung2d.yaml", run=tmp_path / "run", **{"preprocess.workers": 2})
    out = run_preprocess(config)
    ledger = _rows(out / "ledger.csv")
    assert len(ledger) == 267 and {r["status"] for r in ledger} == {"ok"}
    splits = {r["split"] for r in _rows(out / "cases.csv")}
    assert splits == {"train", "val", "test"}
    arrays, _ = load_entry(out / "cache" / "ID_0000_Z_0142.npz")
    assert arrays["views"].shape == (1, 1, 256, 256)  # a one-slice input gives the axial view only
    lung = arrays["mask_views"][0, 0] > 0
    assert 0.05 < lung.mean() < 0.6  # the mask came along, on the same resized grid
    # Lungs are dark inside the body: windowed lung well below windowed soft tissue.
    assert np.median(arrays["views"][0, 0][lung]) < 0.35
