"""A small 3D CNN baseline on the whole preprocessed volume, trained in the same harness.

Example:
    >>> Small3DCNN(num_classes=2)(torch.zeros(2, 1, 28, 28, 28)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.cnn_lstm import ConvEncoder, Pool

__all__ = ["Small3DCNN"]


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
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(in_channels, features, depth, spatial_dims=3, pool=pool)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.out_channels, num_classes))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volume))
