"""The lung segmentation net: a MONAI 2D ``UNet`` on axial slices.

Chosen by measurement on this 2-core CPU. Inference, batch 4, per slice: UNet channels
(8, 16, 32, 64, 128) with 2 residual units 4.9 ms at 256²; (16, ..., 256) 13.5 ms at 256² and
5.8 ms at 192²; MONAI ``BasicUNet`` 51 ms (16 wide) and 305 ms (default 32 wide) at 256², because it
convolves at full resolution. On kmader_lung2d (seed 0, 80 epochs, best val epoch; Dice on the
val split's 512² grid after post-processing, mean / median) the 8-wide net reached 0.9868 / 0.9884,
a 12-wide one (12, ..., 192) 0.9877 / 0.9898 and a 16-wide one 0.9881 / 0.9904. On the test split
the 12-wide net gave 0.9866 mean in seeds 0 and 1, the 8-wide 0.9856 in seed 0. The 8-wide net stays
the default: the whole 512x512x300 scan of ``bench/lungseg_speed.py`` takes 4.8 s with it and 6.4 s
with the 12-wide net, over the 6 s budget, for +0.001 Dice. Cropping each slice to the air inside
the body instead of the whole body (a 1.3x finer grid over the lungs) gave 0.9879 / 0.9902 with the
12-wide net: no gain. A sixth level (8, ..., 256; +0.17 s of net time on that scan) reached mean
val Dice 0.9877 / 0.9864 / 0.9876 in seeds 0 / 1 / 2 against the 5-level net's 0.9867 / 0.9874 /
0.9872: a tie, so the default stays (``bench/lungseg_quality.py --channels``).

Example:
    >>> import torch
    >>> net = build_lung_unet()
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 2, 64, 64])
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNet

__all__ = ["build_lung_unet"]


def build_lung_unet(
    channels: Sequence[int] = (8, 16, 32, 64, 128), num_res_units: int = 2, dropout: float = 0.0
) -> UNet:
    """A 2D UNet, 1 input channel (scaled HU), 2 output logits (background, lung); stride 2 per level."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
        dropout=dropout,
    )
