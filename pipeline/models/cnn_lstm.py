"""MultiViewCNNLSTM: a shared 2D CNN over the three orthogonal views, then an LSTM/GRU over them.

The input is (B, V, C, H, W): V views in the order (axial, coronal, sagittal), C channels per view
(one slice, a k-slice slab, or projections). The views are folded into the batch, encoded by one
shared encoder (time-distributed), unfolded into a (B, V, F) sequence, and read by a recurrent
layer; a linear head maps its final state to class logits.

Example:
    >>> model = MultiViewCNNLSTM(in_channels=5, num_classes=2)
    >>> model(torch.zeros(4, 3, 5, 28, 28)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import ResNet
from torch import nn

__all__ = ["ConvEncoder", "GlobalPool", "MultiViewCNNLSTM", "ResNetEncoder", "time_distributed"]


Pool = Literal["avg", "max", "avgmax"]


class GlobalPool(nn.Module):
    """(B, F, ...) -> (B, F) by the mean or the max over space, or (B, 2F) with both concatenated."""

    def __init__(self, mode: Pool = "avg") -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        parts = {"avg": [flat.mean(-1)], "max": [flat.amax(-1)]}
        return torch.cat(parts["avg"] + parts["max"] if self.mode == "avgmax" else parts[self.mode], dim=1)


class ConvEncoder(nn.Module):
    """``depth`` stages of two conv-BatchNorm-ReLU blocks, each stage but the last max-pooled.

    Widths are ``features * 2**stage``. With ``global_pool`` the output is a (B, F) vector; without
    it, the (B, F, ...) feature map. ``spatial_dims`` 2 or 3. ``pool`` is how the map becomes a
    vector: "avg" suits whole-shape classes; "max" or "avgmax" (both, concatenated: F doubles) keep a
    small local finding, such as a nodule, from being averaged away over the view. ``stem_stride``
    is the stride of the very first convolution: 2 runs every later layer on a grid half as fine,
    a quarter of the cost in 2D, for inputs larger than the detail needs (64² views).
    """

    def __init__(
        self,
        in_channels: int,
        features: int = 32,
        depth: int = 3,
        spatial_dims: int = 2,
        global_pool: bool = True,
        pool: Pool = "avg",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in range(depth):
            width = features * 2**stage
            for block in range(2):
                layers.append(
                    Convolution(
                        spatial_dims,
                        channels,
                        width,
                        strides=stem_stride if stage == block == 0 else 1,
                        act="RELU",
                        norm="BATCH",
                        adn_ordering="NA",
                        bias=False,
                    )
                )
                channels = width
            if stage < depth - 1:
                layers.append(nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2))
        if global_pool:
            layers.append(GlobalPool(pool))
            channels *= 2 if pool == "avgmax" else 1
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    """A small MONAI 2D ResNet (basic blocks, one per stage) as a (B, F) feature extractor."""

    def __init__(self, in_channels: int, features: int = 32) -> None:
        super().__init__()
        widths = [features * 2**i for i in range(4)]
        self.net = ResNet(
            "basic",
            [1, 1, 1, 1],
            widths,
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=True,
            feed_forward=False,
        )
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def time_distributed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply ``module`` to each step of (B, V, ...) by folding V into the batch; returns (B, V, ...)."""
    b, v = x.shape[:2]
    y = module(x.reshape(b * v, *x.shape[2:]))
    return y.reshape(b, v, *y.shape[1:])


class MultiViewCNNLSTM(nn.Module):
    """Shared 2D encoder per view → LSTM/GRU over (axial, coronal, sagittal) → linear head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 2,
        features: int = 32,
        depth: int = 3,
        encoder: Literal["conv", "resnet"] = "conv",
        rnn: Literal["lstm", "gru"] = "lstm",
        hidden: int = 64,
        bidirectional: bool = True,
        dropout: float = 0.3,
        pool: Pool = "avg",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = (
            ConvEncoder(in_channels, features, depth, pool=pool, stem_stride=stem_stride)
            if encoder == "conv"
            else ResNetEncoder(in_channels, features)
        )
        rnn_cls = nn.LSTM if rnn == "lstm" else nn.GRU
        self.rnn = rnn_cls(self.encoder.out_channels, hidden, batch_first=True, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        sequence = time_distributed(self.encoder, views)  # (B, V, F)
        _, state = self.rnn(sequence)
        h_n = state[0] if isinstance(state, tuple) else state  # (directions, B, hidden)
        return self.head(self.dropout(torch.cat(list(h_n), dim=1)))
