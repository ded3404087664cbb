"""Balancing strategies (each sampler yields the class ratio it promises, within binomial tolerance)
and the augmentation that makes repeated cases differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.augment import (
    ViewAugment,
    slab_views_to_volume,
    view_augmentation,
    volume_augmentation,
    volume_to_slab_views,
)
from pipeline.balance import STRATEGIES, balance
from pipeline.config import ClassifyConfig, ViewsConfig
from pipeline.preprocess.views import extract_views

LABELS = np.array([0] * 90 + [1] * 10)


def _drawn(strategy: str, epochs: int = 50, **options) -> tuple[np.ndarray, object]:
    torch.manual_seed(0)
    b = balance(strategy, LABELS, 2, **options)
    counts = np.zeros(2)
    for _ in range(epochs):
        counts += np.bincount(LABELS[list(b.sampler)], minlength=2)
    return counts, b


def test_weighted_sampler_draws_classes_equally():
    counts, b = _drawn("weighted_sampler")
    n = counts.sum()
    assert abs(counts[1] - n / 2) < 4 * np.sqrt(n * 0.25)  # 4 binomial sd around p = 1/2
    assert b.after == {0: 50.0, 1: 50.0} and b.before == {0: 90, 1: 10}


def test_none_keeps_the_ratio_exactly():
    counts, b = _drawn("none", epochs=3)
    assert counts.tolist() == [270, 30] and b.after == {0: 90.0, 1: 10.0}


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_oversample_duplicates_minority_to_ratio(ratio):
    counts, b = _drawn("oversample_augment", epochs=1, oversample_ratio=ratio)
    assert counts.tolist() == [90, round(90 * ratio)]
    assert b.after == {0: 90.0, 1: float(round(90 * ratio))}


def test_oversample_redraws_its_repeats_each_epoch():
    labels = np.array([0] * 22 + [1] * 6)  # 16 repeats of 6 cases: 4 get a fourth copy, 2 a third
    torch.manual_seed(0)
    sampler = balance("oversample_augment", labels, 2).sampler
    epochs = [np.bincount(list(sampler), minlength=len(labels))[22:] for _ in range(20)]
    for copies in epochs:
        assert sorted(copies.tolist()) == [3, 3, 4, 4, 4, 4]  # all within one repeat of each other
    assert len({tuple(c) for c in epochs}) > 1  # and which cases get the extra one changes


@pytest.mark.parametrize("ratio", [1.0, 2.0])
def test_undersample_reduces_majority_each_epoch(ratio):
    torch.manual_seed(0)
    b = balance("undersample", LABELS, 2, undersample_ratio=ratio)
    epochs = [list(b.sampler) for _ in range(20)]
    for drawn in epochs:
        assert np.bincount(LABELS[drawn], minlength=2).tolist() == [10 * ratio, 10]
    assert len({tuple(sorted(e)) for e in epochs}) > 1  # a fresh majority subset per epoch
    seen = set().union(*epochs)
    assert len(seen & set(np.flatnonzero(LABELS == 0))) > 60  # over epochs most majority cases are used


def test_loss_strategies_keep_sampling_and_change_the_loss():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2]])
    target = torch.tensor([1, 0])
    plain = balance("none", LABELS, 2).loss(logits, target)
    weighted = balance("class_weighted_loss", LABELS, 2)
    assert torch.allclose(weighted.loss.weight, torch.tensor([100 / 180, 100 / 20]))
    assert weighted.loss(logits, target) > plain
    focal = balance("focal", LABELS, 2, focal_gamma=2.0)
    assert 0 < focal.loss(logits, target) < weighted.loss(logits, target)
    assert focal.after == weighted.after == {0: 90.0, 1: 10.0}
    wrong = torch.tensor([[0.0, 2.0], [2.0, 0.0]], requires_grad=True)  # equally wrong, one per class
    focal.loss(wrong, torch.tensor([0, 1])).backward()
    majority, minority = wrong.grad.norm(dim=1)
    assert minority / majority == pytest.approx(9.0)  # the classes' inverse frequencies, 100/20 : 100/180
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))  # with gamma 0 it is class_weighted_loss
    assert balance("focal", LABELS, 2, focal_gamma=0.0).loss(x, y) == pytest.approx(
        float(weighted.loss(x, y))
    )


def test_report_and_unknown_strategy():
    report = balance("weighted_sampler", LABELS, 2).report(["normal", "mass"])
    assert report["before"] == {"normal": 90, "mass": 10} and report["after_per_epoch"]["mass"] == 50.0
    assert set(STRATEGIES) == {
        "none",
        "weighted_sampler",
        "oversample_augment",
        "undersample",
        "class_weighted_loss",
        "focal",
    }
    with pytest.raises(ValueError, match="known"):
        balance("smote", LABELS, 2)


@pytest.mark.parametrize("mode", ["slab", "max", "projections"])
@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 2)])
def test_view_flip_matches_views_of_the_flipped_volume(mode, axes):
    """Flipping the three views must equal cutting the views from the flipped anatomy."""
    rng = np.random.default_rng(0)
    volume = rng.random((9, 11, 13)).astype(np.float32)
    center = (4, 5, 6)  # the middle voxel: a flip maps the cut planes onto themselves
    aug = ViewAugment(ClassifyConfig(), flip_channels=mode == "slab")
    flipped = torch.from_numpy(extract_views(np.flip(volume, axes).copy(), center, mode, 3))
    assert torch.allclose(aug.flip(torch.from_numpy(extract_views(volume, center, mode, 3)), axes), flipped)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1, 2)])
def test_view_flip_keeps_stacked_slabs_apart(axes):
    """With two slabs in C (image, then a second map of the same slices), each flips in place."""
    rng = np.random.default_rng(1)
    image, other = rng.random((2, 9, 9, 9)).astype(np.float32)
    center = (4, 4, 4)

    def views(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(
            np.concatenate([extract_views(a, center, "slab", 5), extract_views(b, center, "slab", 5)], 1)
        )

    aug = ViewAugment(ClassifyConfig(), flip_channels=True, blocks=2)
    expected = views(np.flip(image, axes).copy(), np.flip(other, axes).copy())
    assert torch.equal(aug.flip(views(image, other), axes), expected)


@pytest.mark.parametrize("side", [7, 8])
def test_whole_volume_slab_views_round_trip_through_the_volume(side):
    """The views rebuilt from a volume equal extract_views' cut of every slice, block by block."""
    rng = np.random.default_rng(2)
    image, other = rng.random((2, side, side, side)).astype(np.float32)
    expected = np.concatenate([extract_views(v, None, "slab", side) for v in (image, other)], axis=1)
    views = volume_to_slab_views(torch.from_numpy(np.stack([image, other])))
    assert torch.equal(views, torch.from_numpy(expected))
    assert torch.equal(slab_views_to_volume(views, blocks=2), torch.from_numpy(np.stack([image, other])))


def test_volume_affine_rotates_the_anatomy_behind_all_three_views():
    """A 3D rotation moves an off-centre blob in the volume; the views are recut from that volume."""
    side = 16
    volume = np.zeros((side, side, side), np.float32)
    volume[11:14, 7:10, 7:10] = 1.0  # right of centre along i only
    views = torch.from_numpy(extract_views(volume, None, "slab", side))
    cfg = ClassifyConfig(affine_space="volume", affine_prob=1.0, rotate_degrees=45.0, scale=0.0, flip_axes=())
    aug = view_augmentation(cfg, ViewsConfig(mode="slab", thickness=side), (side,) * 3)
    moved = [aug.set_random_state(seed)(views) for seed in range(4)]
    for out in moved:
        rebuilt = slab_views_to_volume(out).numpy()[0]
        assert torch.allclose(volume_to_slab_views(torch.from_numpy(rebuilt)[None]), out)
        assert rebuilt.sum() == pytest.approx(volume.sum(), rel=0.15)  # rotated, not cut off
    centroids = [np.argwhere(slab_views_to_volume(out).numpy()[0] > 0.5).mean(axis=0) for out in moved]
    assert max(np.abs(c - [12, 8, 8]).max() for c in centroids) > 1.0  # the blob left its place


def test_volume_affine_needs_whole_volume_slab_views():
    cfg = ClassifyConfig(affine_space="volume")
    with pytest.raises(ValueError, match="thickness 5"):
        view_augmentation(cfg, ViewsConfig(mode="slab", thickness=5), (28, 28, 28))


def test_view_augmentation_is_seeded_and_varies():
    views = torch.rand(3, 3, 16, 16)
    aug = view_augmentation(ClassifyConfig(affine_prob=1.0, noise_std=0.05), ViewsConfig(), (16, 16, 16))
    first = aug.set_random_state(1)(views)
    assert torch.equal(first, aug.set_random_state(1)(views))
    assert not torch.equal(first, aug.set_random_state(2)(views)) and first.shape == views.shape
    volume = volume_augmentation(ClassifyConfig(affine_prob=1.0))
    volume.set_random_state(0)
    assert volume(torch.rand(1, 8, 8, 8)).shape == (1, 8, 8, 8)


def test_intensity_jitter_and_noise_leave_a_distance_map_alone():
    views = torch.rand(3, 8, 16, 16)  # 4-slice slabs: the image's, then its distance map's
    cfg = ClassifyConfig(affine_prob=0.0, flip_axes=(), intensity_prob=1.0, noise_std=0.1)
    out = view_augmentation(cfg, ViewsConfig(mode="slab", thickness=4, distance=True), (16, 16, 16))(views)
    assert torch.equal(out[:, 4:], views[:, 4:]) and not torch.allclose(out[:, :4], views[:, :4])


def test_an_epoch_drops_at_most_a_lone_last_case():
    from pipeline.train.classify import lone_last_case

    # 12 undersampled cases in batches of 8 train all 12 (they used to train 8)
    assert [lone_last_case(n, 8) for n in (12, 17, 16, 9, 8, 3, 1)] == [False, True, False, True] + [
        False
    ] * 3
