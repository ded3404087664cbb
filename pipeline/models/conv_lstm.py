"""A ConvLSTM cell, and the multi-view ConvLSTM classifier built on it (MONAI has no ConvLSTM).

The classifier encodes each view to a feature map with a shared 2D encoder (no global pooling),
runs the ConvLSTM over the (axial, coronal, sagittal) sequence of maps, pools the last hidden
state and applies a linear head. Views must share H and W.

Example:
    >>> model = MultiViewConvLSTM(in_channels=1, num_classes=2)
    >>> model(torch.zeros(2, 3, 1, 28, 28)).shape
    torch.Size([2, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.cnn_lstm import ConvEncoder, time_distributed

__all__ = ["ConvLSTMCell", "MultiViewConvLSTM"]


class ConvLSTMCell(nn.Module):
    """LSTM gates computed by one convolution over [input, hidden] (Shi et al., 2015, no peepholes)."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: (B, C, H, W) and (h, c) → new (h, c); a missing state starts at zeros."""
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            state = (zeros, zeros)
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class MultiViewConvLSTM(nn.Module):
    """Shared 2D encoder per view → ConvLSTM over the view sequence → pooled last state → head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        features: int = 32,
        depth: int = 3,
        hidden: int = 64,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(in_channels, features, depth, global_pool=False)
        self.cell = ConvLSTMCell(self.encoder.out_channels, hidden)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        maps = time_distributed(self.encoder, views)  # (B, V, F, h, w)
        state = None
        for step in range(maps.shape[1]):
            state = self.cell(maps[:, step], state)
        return self.head(state[0])
