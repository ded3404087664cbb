"""Random augmentation chains (MONAI Rand* transforms) for three-view stacks and for volumes.

View stacks are (V, C, H, W) in the order (axial, coronal, sagittal). A flip of a volume axis is
applied to every view that contains that axis, so all views stay consistent with one flipped
anatomy: by ``VIEW_AXES``, each view's (C, H, W) dimensions are the volume axes (i, j, k) listed, so
a left-right flip (volume axis 0) flips the W axis of the axial and coronal views and reverses the
slab order (C) of the sagittal view. Channels are reversed only for slab/slice views
(``flip_channels``); projection channels are not an axis. When C holds several slabs of the same
slices (``blocks``: the image's slab, then the distance map's), each is reversed in place. Then each
view gets a small random rotation/scaling, and the stack intensity jitter and Gaussian noise.

Both chains are MONAI ``Randomizable``: seed them with ``set_random_state`` (the training dataset
does this per item from the torch RNG, so runs are reproducible and resumable).

Example:
    >>> aug = view_augmentation(ClassifyConfig(), flip_channels=True).set_random_state(0)
    >>> aug(torch.zeros(3, 5, 28, 28)).shape
    torch.Size([3, 5, 28, 28])
"""

from __future__ import annotations

import math

import torch
from monai.transforms import (
    Compose,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    Randomizable,
    RandScaleIntensity,
    RandShiftIntensity,
)
from monai.utils import convert_to_tensor

from pipeline.config import ClassifyConfig

__all__ = ["VIEW_AXES", "ViewAugment", "view_augmentation", "volume_augmentation"]

# For each view, the volume axes (i, j, k) that its (C, H, W) dimensions run along.
VIEW_AXES = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
VIEW_ORDER = ("axial", "coronal", "sagittal")


def _intensity(cfg: ClassifyConfig) -> list[Randomizable]:
    chain: list[Randomizable] = []
    if cfg.intensity_prob > 0:
        chain += [
            RandScaleIntensity(0.1, prob=cfg.intensity_prob),
            RandShiftIntensity(0.1, prob=cfg.intensity_prob),
        ]
    if cfg.noise_std > 0:
        chain.append(RandGaussianNoise(prob=0.5, std=cfg.noise_std))
    return chain


def _affine(cfg: ClassifyConfig, dims: int) -> RandAffine:
    angle = math.radians(cfg.rotate_degrees)
    rotate = angle if dims == 2 else (angle, angle, angle)
    return RandAffine(
        prob=cfg.affine_prob, rotate_range=rotate, scale_range=(cfg.scale,) * dims, padding_mode="zeros"
    )


class ViewAugment(Randomizable):
    """Consistent random flips across views, then per-view affine, then intensity and noise."""

    def __init__(
        self, cfg: ClassifyConfig, flip_channels: bool = True, flip_prob: float = 0.5, blocks: int = 1
    ) -> None:
        self.flip_axes = tuple(cfg.flip_axes)
        self.flip_channels = flip_channels
        self.flip_prob = flip_prob
        self.blocks = blocks
        self.affine = _affine(cfg, 2)
        self.intensity = Compose(_intensity(cfg))
        self._flips: tuple[int, ...] = ()

    def set_random_state(self, seed: int | None = None, state=None) -> ViewAugment:
        super().set_random_state(seed, state)
        self.affine.set_random_state(int(self.R.randint(2**31)))
        self.intensity.set_random_state(int(self.R.randint(2**31)))
        return self

    def randomize(self, data: object = None) -> None:
        self._flips = tuple(a for a in self.flip_axes if self.R.rand() < self.flip_prob)

    def flip(self, views: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        """Flip volume ``axes`` in every view (V = 3) or in the axial view alone (V = 1)."""
        out = []
        for name, view in zip(VIEW_ORDER, views, strict=False):
            dims = [VIEW_AXES[name].index(a) + 1 for a in axes]  # in the (blocks, C, H, W) view
            dims = [d for d in dims if d > 1 or self.flip_channels]
            blocked = view.reshape(self.blocks, -1, *view.shape[1:])
            out.append(torch.flip(blocked, dims).reshape(view.shape) if dims else view)
        return torch.stack(out)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        self.randomize()
        views = self.flip(convert_to_tensor(views, track_meta=False), self._flips)
        views = torch.stack([convert_to_tensor(self.affine(v), track_meta=False) for v in views])
        return convert_to_tensor(self.intensity(views), track_meta=False)


def view_augmentation(cfg: ClassifyConfig, flip_channels: bool = True, blocks: int = 1) -> ViewAugment:
    """The augmentation chain for (V, C, H, W) view stacks whose C holds ``blocks`` equal slabs."""
    return ViewAugment(cfg, flip_channels, blocks=blocks)


def volume_augmentation(cfg: ClassifyConfig) -> Compose:
    """The augmentation chain for (1, X, Y, Z) volumes: flips, small affine, intensity, noise."""
    flips = [RandFlip(prob=0.5, spatial_axis=a) for a in cfg.flip_axes]
    return Compose([*flips, _affine(cfg, 3), *_intensity(cfg)])
