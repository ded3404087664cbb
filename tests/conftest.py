"""Shared fixtures: the shared data folder and a small synthetic CT writer."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_raises() -> None:
    """SIGINT raises KeyboardInterrupt here and in the processes the tests start, as from a terminal.

    A test runner started in the background of a non-interactive shell inherits SIGINT ignored, and
    so would every medpipe process it starts: the Ctrl-C tests would then test nothing.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repository; the test is skipped when it is absent."""
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"shared data folder not found: {folder}")
    return folder


def ct_array(shape: tuple[int, int, int] = (24, 20, 16), dtype=np.int16) -> np.ndarray:
    """A CT-like (i, j, k) array in HU: air -1000, an elliptic 40 HU body, a -850 HU lung blob."""
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    array = np.full(shape, -1000.0)
    body = (i / 0.8) ** 2 + (j / 0.7) ** 2 <= 1.0
    array[body] = 40.0
    lung = ((i - 0.25) / 0.3) ** 2 + (j / 0.35) ** 2 + (k / 0.6) ** 2 <= 1.0
    array[lung & body] = -850.0
    return array.astype(dtype)


@pytest.fixture
def make_ct() -> Callable[..., Path]:
    """A factory ``make_ct(path, shape, spacing, affine, dtype)`` writing a synthetic CT NIfTI.

    Without an affine the volume is axis-aligned RAS with the given spacing, centred on the origin.
    Returns the path written.
    """

    def _make(
        path: str | Path,
        shape: tuple[int, int, int] = (24, 20, 16),
        spacing: tuple[float, float, float] = (1.5, 1.5, 2.5),
        affine: np.ndarray | None = None,
        dtype=np.int16,
    ) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if affine is None:
            affine = np.diag([*spacing, 1.0])
            affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)
        image = nib.Nifti1Image(ct_array(shape, dtype), affine)
        image.header.set_data_dtype(dtype)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, path)
        return path

    return _make
