"""NumPy arrays over a SimpleITK image's own voxel memory (no copy), which keep the image alive."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

__all__ = ["array_view", "writable_bytes"]


class _ImageBuffer:
    """The voxel memory of a SimpleITK image, as an array base that holds a reference to the image.

    A bare ``sitk.GetArrayViewFromImage`` view does not keep its image alive, so a view of a
    temporary (``read_volume(p).array``) would read freed memory.
    """

    def __init__(self, image: sitk.Image, writable: bool = False) -> None:
        self.image = image
        interface = dict(sitk.GetArrayViewFromImage(image).__array_interface__)
        interface["data"] = (interface["data"][0], not writable)  # (pointer, read-only flag)
        self.__array_interface__ = interface


def array_view(image: sitk.Image) -> np.ndarray:
    """A read-only (i, j, k) view of a SimpleITK image's voxels (no copy); it keeps the image alive."""
    return np.asarray(_ImageBuffer(image)).transpose(2, 1, 0)


def writable_bytes(image: sitk.Image) -> np.ndarray:
    """The image's voxel memory as a flat, writable uint8 array, in the image's own voxel order."""
    return np.asarray(_ImageBuffer(image, writable=True)).reshape(-1).view(np.uint8)
