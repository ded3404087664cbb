"""View options: projections restricted to a mask, and the error when the mask is missing."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import PreprocessConfig
from pipeline.io import VolumeError, read_volume, save_nifti


def _scan_with_two_blobs(tmp_path, rim: float = 0.0):
    """A 40^3 volume: a 'lung' mask box holding one bright blob, a second blob outside the mask;
    the mask's outer face i = 4 has the value ``rim``."""
    image = np.zeros((40, 40, 40), np.float32)
    image[4, 4:20, 4:36] = rim
    image[8:12, 8:12, 18:22] = 100.0  # inside the mask
    image[28:32, 28:32, 18:22] = 100.0  # outside the mask
    mask = np.zeros(image.shape, np.uint8)
    mask[4:20, 4:20, 4:36] = 1
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    return (
        read_volume(save_nifti(tmp_path / "img.nii.gz", image, affine)),
        read_volume(save_nifti(tmp_path / "mask.nii.gz", mask, affine)),
    )


def _native_mip(side: int, **views) -> PreprocessConfig:
    """Max projections through the whole of a ``side``^3 volume on its own 1 mm grid, unscaled."""
    return PreprocessConfig(
        spacing=(1.0, 1.0, 1.0),
        shape=(side, side, side),
        fit="pad",
        crop_foreground=False,
        intensity={"mode": "none"},
        views={"mode": "max", "thickness": 100, **views},
    )


def _axial_mip(tmp_path, rim: float = 0.0, **views) -> np.ndarray:
    """The axial max projection (1 mm grid, no intensity change) of the two-blob scan."""
    from pipeline.preprocess.stage import preprocess_volume

    image, mask = _scan_with_two_blobs(tmp_path, rim)
    return preprocess_volume(image, mask, _native_mip(40, **views))[0]["views"][0, 0]


@pytest.mark.parametrize("within_mask", [False, True])
def test_max_projection_within_mask_hides_what_lies_outside(tmp_path, within_mask):
    axial = _axial_mip(tmp_path, within_mask=within_mask)
    # Display: row = 39 - j, col = 39 - i, so the blob in the mask (i, j in 8..11) is drawn at
    # rows/cols 28..31 and the one outside it (i, j in 28..31) at rows/cols 8..11.
    assert axial[28:32, 28:32].max() == 100.0
    assert axial[8:12, 8:12].max() == (0.0 if within_mask else 100.0)


def test_within_mask_without_a_mask_is_a_clear_error(tmp_path):
    from pipeline.preprocess.stage import preprocess_volume

    image, _ = _scan_with_two_blobs(tmp_path)
    cfg = PreprocessConfig(shape=(40, 40, 40), intensity={"mode": "none"}, views={"within_mask": True})
    with pytest.raises(VolumeError, match=r"within_mask.*no mask") as err:
        preprocess_volume(image, None, cfg)
    assert "img.nii.gz" in str(err.value)


@pytest.mark.parametrize("margin_mm", [0.0, 1.0])
def test_mask_margin_drops_the_partial_volume_rim(tmp_path, margin_mm):
    axial = _axial_mip(tmp_path, rim=50.0, within_mask=True, mask_margin_mm=margin_mm)
    # the face i = 4, j in 4..19 is drawn in column 35, rows 20..35; the blob inside stays
    assert axial[20:36, 35].max() == (0.0 if margin_mm else 50.0)
    assert axial[28:32, 28:32].max() == 100.0


def test_a_slab_near_an_edge_or_deeper_than_the_volume_keeps_distinct_slices():
    """Axial channels of a volume whose value is its k index: every slice a slab promises."""
    from pipeline.preprocess.views import center_index, extract_views

    ramp = np.broadcast_to(np.arange(28, dtype=np.float32), (8, 8, 28)).copy()
    deep = {"center": (4, 4, 3), "thickness": 30}  # off-centre, deeper than the volume
    assert extract_views(ramp, mode="max", **deep)[0, 0, 14, 14] == 27
    assert extract_views(ramp, mode="mean", **deep)[0, 0, 14, 14] == pytest.approx(13.5)
    edge = extract_views(ramp, center=(4, 4, 1), mode="slab", thickness=5)[0, :, 14, 14]
    assert edge.tolist() == [0, 1, 2, 3, 4]  # shifted inwards, not the edge slice twice
    cube = np.broadcast_to(np.arange(30, dtype=np.float32), (30, 30, 30)).copy()
    whole = extract_views(cube, center=center_index(cube.shape), mode="slab", thickness=30)
    assert whole[0, :, 15, 15].tolist() == list(range(30))
    assert center_index((30, 28, 22)) == (15, 14, 11)  # halves round up whatever the parity


def test_mask_labels_beyond_255_keep_their_values(tmp_path):
    from pipeline.preprocess.stage import preprocess_volume

    mask = np.zeros((20, 20, 20), np.uint16)
    mask[2:6, 2:6, 2:6], mask[12:18, 12:18, 12:18] = 256, 300  # an atlas's labels
    affine = np.eye(4)
    image = read_volume(save_nifti(tmp_path / "img.nii.gz", np.zeros(mask.shape, np.float32), affine))
    labels = read_volume(save_nifti(tmp_path / "mask.nii.gz", mask, affine))
    arrays, _ = preprocess_volume(image, labels, _native_mip(20))
    assert set(np.unique(arrays["mask_views"]).tolist()) == {0, 256, 300}
