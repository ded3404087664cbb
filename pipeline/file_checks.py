"""File integrity checks that ITK's readers skip.

ITK's NIfTI reader zero-fills a truncated gzip stream, turns NaN/Inf voxels into 0 and "fixes"
zero or negative pixdim; a MetaImage header whose data file is missing gives only a generic error.
These checks read the file as stored and raise ``VolumeError`` with the specific reason. The common
case costs little: a gzip stream is only decompressed when its trailer's size field disagrees with
the size the header promises.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from pipeline.errors import VolumeError

__all__ = [
    "check_meta_data_file",
    "check_nifti_data",
    "check_nifti_header",
    "gzip_problem",
    "is_gzip",
    "nifti_nonfinite",
]


def raw_nifti_header(path: Path) -> nib.Nifti1Header | None:
    """The NIfTI header exactly as stored (nibabel's loader and ITK silently 'fix' bad pixdim)."""
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(path) as fh:
                return klass.from_fileobj(fh, check=False)
        except Exception:  # wrong header size for this class, or unreadable: the caller decides
            continue
    return None


def is_gzip(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def gzip_problem(path: Path, expected: int | None) -> str | None:
    """Why a gzip file is truncated or corrupt, or None if its stream is whole.

    ITK's NIfTI reader zero-fills whatever a truncated stream lacks, so this must be checked here.
    A trailer whose size field matches the expected size is taken as whole; otherwise the stream is
    decompressed (in chunks, without keeping the output) to find out.
    """
    if expected is not None and path.stat().st_size >= 18:
        with path.open("rb") as fh:
            fh.seek(-4, os.SEEK_END)
            if int.from_bytes(fh.read(4), "little") == expected % 2**32:
                return None
    total = 0
    decoder = zlib.decompressobj(wbits=31)
    with path.open("rb") as fh:
        try:
            while chunk := fh.read(1 << 20):
                while chunk:
                    total += len(decoder.decompress(chunk))
                    chunk = decoder.unused_data if decoder.eof else b""
                    if chunk:  # a further gzip member
                        decoder = zlib.decompressobj(wbits=31)
        except zlib.error as exc:
            return f"corrupt gzip data ({exc})"
    if not decoder.eof:
        return f"truncated gzip data (the stream ends after {total:,} bytes)"
    if expected is not None and total < expected:
        return f"truncated data ({total:,} of {expected:,} bytes)"
    return None


def check_nifti_header(path: Path) -> None:
    """A NIfTI header, read once: its stored spacing must be finite and positive, and its qform and
    sform, where both are set, must agree (``_check_transforms``)."""
    header = raw_nifti_header(path)
    if header is None:
        return  # not a NIfTI header after all: ITK gives the error
    _check_spacing(path, header)
    _check_transforms(path, header)


def _check_spacing(path: Path, header: nib.Nifti1Header) -> None:
    n = min(max(int(header["dim"][0]), 1), 3)
    pixdim = np.asarray(header["pixdim"][1 : 1 + n], dtype=float)
    used = np.asarray(header["dim"][1 : 1 + n]) > 1  # a one-voxel axis has no meaningful spacing
    if not np.all(np.isfinite(pixdim[used])) or np.any(pixdim[used] <= 0):
        raise VolumeError(path, f"spacing (pixdim) {tuple(pixdim.tolist())} is not finite and positive")


def _check_transforms(path: Path, header: nib.Nifti1Header, tolerance_mm: float = 0.1) -> None:
    """qform and sform, where both are set, must put the voxels in the same place: ITK (SimpleITK,
    Slicer) may read the qform where nibabel and FSL read the sform, so disagreeing transforms leave
    left and right up to whichever reader comes next."""
    if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
        return
    dims = np.asarray(header["dim"][1:4], dtype=float).clip(min=1) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, dims[0]) for j in (0, dims[1]) for k in (0, dims[2])])
    qform, sform = header.get_qform(), header.get_sform()
    gap = float(np.abs(corners @ qform.T - corners @ sform.T)[:, :3].max())
    if gap > tolerance_mm:
        raise VolumeError(
            path,
            f"qform (code {int(header['qform_code'])}) and sform (code {int(header['sform_code'])}) disagree "
            f"by up to {gap:.1f} mm at the volume's corners, so readers place it differently; set the "
            "wrong one's code to 0",
        )


def check_nifti_data(path: Path) -> None:
    """A NIfTI file must hold all the voxel bytes its header promises, in a whole gzip stream."""
    header = raw_nifti_header(path)
    if header is None:
        return
    ndim = int(header["dim"][0])
    dims = [int(d) for d in header["dim"][1 : 1 + ndim]] if 0 < ndim <= 7 else []
    if not dims or min(dims) < 1:
        return  # check_header reports the size
    expected = int(header["vox_offset"]) + int(np.prod(dims, dtype=np.int64)) * int(header["bitpix"]) // 8
    if is_gzip(path):
        problem = gzip_problem(path, expected)
        if problem:
            raise VolumeError(path, problem)
    elif path.stat().st_size < expected:
        raise VolumeError(path, f"truncated data ({path.stat().st_size:,} of {expected:,} bytes)")


def check_meta_data_file(path: Path) -> None:
    """A .mhd header's separate data file must exist."""
    try:
        with path.open("rb") as fh:
            lines = fh.read(1 << 16).decode("latin-1").splitlines()
    except OSError:
        return
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if name and name not in ("LOCAL", "LIST") and "%" not in name and " " not in name:
                data = path.parent / name
                if not data.is_file():
                    raise VolumeError(path, f"data file {name} not found (named by ElementDataFile)")
            return


def nifti_nonfinite(path: Path, volume_index: int | None) -> int:
    """NaN/Inf voxels stored in a float NIfTI file (ITK's reader silently turns them into 0)."""
    image = nib.load(path)
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return 0
    data = image.dataobj[..., volume_index] if len(image.shape) == 4 else image.dataobj
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(data))))
