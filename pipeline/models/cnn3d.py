"""A small 3D CNN baseline on the whole preprocessed volume, trained in the same harness.

``Small3DCNN`` reads the cached volume. ``SlabVolume3DCNN`` is the same net on the volume behind
whole-volume slab views (every slice of a cube as a view's channels), so it takes the views the
CNN-LSTM takes, with their view-consistent augmentation, and can join it in one ensemble.

Example:
    >>> Small3DCNN(num_classes=2)(torch.zeros(2, 1, 28, 28, 28)).shape
    torch.Size([2, 2])
    >>> SlabVolume3DCNN(num_classes=2)(torch.zeros(2, 3, 56, 28, 28)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.augment import slab_views_to_volume
from pipeline.models.cnn_lstm import ConvEncoder, Pool

__all__ = ["SlabVolume3DCNN", "Small3DCNN"]


class Small3DCNN(nn.Module):
    """3D conv-BatchNorm-ReLU stages → global pool (avg, max or both) → dropout → linear head."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        features: int = 16,
        depth: int = 3,
        dropout: float = 0.3,
        pool: Pool = "avg",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(
            in_channels, features, depth, spatial_dims=3, pool=pool, stem_stride=stem_stride
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_channels, num_classes))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volume))


class SlabVolume3DCNN(Small3DCNN):
    """``Small3DCNN`` (one input channel) on the first slab's volume of whole-volume slab views
    (B, 3, blocks * D, D, D)."""

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        side = views.shape[-1]
        if views.ndim != 5 or views.shape[-3] % side or views.shape[-2] != side:
            raise ValueError(
                f"cnn3d_views needs whole-volume slab views (B, 3, blocks * D, D, D), got "
                f"{tuple(views.shape)}: preprocess.views mode 'slab', center 'volume', thickness = the side"
            )
        return super().forward(slab_views_to_volume(views[:, :, :side]))
