"""The lung segmentation net: a MONAI 2D ``UNet`` on axial slices.

Chosen by measurement on this 2-core CPU. Inference, batch 4, per slice: UNet channels
(8, 16, 32, 64, 128) with 2 residual units 4.9 ms at 256²; (16, ..., 256) 13.5 ms at 256² and
5.8 ms at 192²; MONAI ``BasicUNet`` 51 ms (16 wide) and 305 ms (default 32 wide) at 256², because it
convolves at full resolution. On kmader_lung2d (seed 0, 80 epochs, best val epoch; Dice on the
val split's 512² grid after post-processing, mean / median) the 8-wide net reached 0.9868 / 0.9884,
a 12-wide one (12, ..., 192) 0.9877 / 0.9898 and a 16-wide one 0.9881 / 0.9904. Cropping each slice
to the air inside the body instead of the whole body (a 1.3x finer grid over the lungs) gave
0.9879 / 0.9902 with the 12-wide net: no gain. A sixth level (8, ..., 256) tied with five on val.

The default is the 16-wide net (``SegmentConfig.channels``), the best on val above. It became
affordable under bfloat16 autocast (``pipeline.train.precision``): 300 slices take 2.35 s of net
time against 3.84 s in float32 (the 8-wide net: 1.17 against 1.81; ``bench/lungseg_speed.py
--precision``). On the test split, 3 seeds each
(``bench/lungseg_quality.py``; mean / median / worst slice), the 16-wide net trained in bfloat16
gave 0.9869-0.9876 / 0.9878-0.9885 / 0.954-0.975 against the 8-wide float32 net's 0.9856-0.9863 /
0.9865-0.9882 / 0.933-0.967. The whole 512x512x300 scan of ``bench/lungseg_speed.py`` takes 5.4 s
with it (the 8-wide net: 4.0 s).

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
    channels: Sequence[int] = (16, 32, 64, 128, 256), num_res_units: int = 2, dropout: float = 0.0
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
