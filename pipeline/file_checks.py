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
    "INFLATE_STEP",
    "MAX_TRAILING",
    "check_detached_data",
    "check_nifti_data",
    "check_nifti_header",
    "gzip_problem",
    "is_gzip",
    "nifti_nonfinite",
    "trailing_problem",
]


MAX_DEFLATE_RATIO = 1032  # the most deflate can pack: a few bytes per 258-byte match of 32 KiB runs
INFLATE_STEP = 1 << 22  # at most this many inflated bytes per decompress call
MAX_TRAILING = 64 << 20  # inflated bytes after a NIfTI's voxels before the file counts as a bomb
PLAUSIBLE_SPACING_MM = (1e-4, 1e5)  # from 0.1 um to 100 m
MM_PER_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}  # NIfTI xyzt_units; unknown is taken as mm


def trailing_problem() -> str:
    """The reason for refusing a .nii.gz with a huge tail: a decompression bomb, or not one image."""
    return f"more than {MAX_TRAILING >> 20} MiB of data after the voxels the header promises"


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
                    total += len(decoder.decompress(chunk, INFLATE_STEP))  # bounded memory per step
                    if expected is not None and total > expected + MAX_TRAILING:
                        return trailing_problem()
                    if decoder.unconsumed_tail:
                        chunk = decoder.unconsumed_tail
                        continue
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
    """A NIfTI header, read once: its stored spacing must be finite, positive and plausible, its
    qform and sform, where both are set, must agree (``_check_transforms``), and the file must be
    able to hold the voxels it promises (``_check_capacity``)."""
    header = raw_nifti_header(path)
    if header is None:
        return  # not a NIfTI header after all: ITK gives the error
    _check_spacing(path, header)
    _check_transforms(path, header)
    _check_capacity(path, header)


def _promised_bytes(header: nib.Nifti1Header) -> int | None:
    """vox_offset plus the voxel bytes the header's dims promise (None if the dims are not sane)."""
    ndim = int(header["dim"][0])
    dims = [int(d) for d in header["dim"][1 : 1 + ndim]] if 0 < ndim <= 7 else []
    if not dims or min(dims) < 1:
        return None  # check_header reports the size
    return int(header["vox_offset"]) + int(np.prod(dims, dtype=np.int64)) * int(header["bitpix"]) // 8


def _check_capacity(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse, before anything is allocated, a .nii.gz too small to hold what its header promises
    (deflate packs at most about 1032:1, so a few hundred bytes cannot hold 2 GB of voxels), and a
    single-file NIfTI whose voxels would start inside its own header."""
    promised = _promised_bytes(header)
    if promised is None:
        return
    single_file = path.name.lower().endswith((".nii", ".nii.gz"))
    if single_file and int(header["vox_offset"]) < header.sizeof_hdr:
        raise VolumeError(
            path, f"vox_offset {int(header['vox_offset'])} lies inside the {header.sizeof_hdr}-byte header"
        )
    size = path.stat().st_size
    if is_gzip(path) and promised > size * MAX_DEFLATE_RATIO:
        raise VolumeError(
            path,
            f"the header promises {promised:,} bytes, more than this {size:,}-byte gzip file can hold",
        )


def _check_spacing(path: Path, header: nib.Nifti1Header) -> None:
    n = min(max(int(header["dim"][0]), 1), 3)
    pixdim = np.asarray(header["pixdim"][1 : 1 + n], dtype=float)
    used = np.asarray(header["dim"][1 : 1 + n]) > 1  # a one-voxel axis has no meaningful spacing
    if not np.all(np.isfinite(pixdim[used])) or np.any(pixdim[used] <= 0):
        raise VolumeError(path, f"spacing (pixdim) {tuple(pixdim.tolist())} is not finite and positive")
    low, high = PLAUSIBLE_SPACING_MM
    unit = header.get_xyzt_units()[0]
    mm = pixdim[used] * MM_PER_UNIT.get(unit, 1.0)
    if np.any((mm < low) | (mm > high)):
        raise VolumeError(
            path, f"spacing (pixdim) {tuple(pixdim.tolist())} {unit} is outside {low:g}..{high:g} mm"
        )


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
    expected = _promised_bytes(header)
    if expected is None:
        return
    if is_gzip(path):
        problem = gzip_problem(path, expected)
        if problem:
            raise VolumeError(path, problem)
    elif path.stat().st_size < expected:
        raise VolumeError(path, f"truncated data ({path.stat().st_size:,} of {expected:,} bytes)")


def _header_lines(path: Path) -> list[str]:
    """The text lines at the start of a MetaImage or NRRD header (its first 64 KiB)."""
    try:
        with path.open("rb") as fh:
            return fh.read(1 << 16).decode("latin-1").splitlines()
    except OSError:
        return []


def _detached_file(path: Path, name: str, key: str) -> None:
    """A header's separate data file must be named inside the header's own folder (or below it)
    and be a regular file: not a device such as /dev/zero, nor a file elsewhere on the machine. The
    name, not a link's target, is what must stay inside (annexed datasets link data files away)."""
    folder = path.parent.absolute()
    data = Path(os.path.normpath(folder / name))
    if not data.is_relative_to(folder):
        raise VolumeError(path, f"{key} {name!r} lies outside the header's folder")
    if not data.exists():
        raise VolumeError(path, f"data file {name} not found (named by {key})")
    if not data.is_file():
        raise VolumeError(path, f"{key} {name!r} is not a regular file")


def _nrrd_pattern(path: Path, value: str) -> list[str]:
    """The files of NRRD's ``data file: <format> <min> <max> <step> [<subdim>]`` form."""
    fmt, *numbers = value.split()
    try:
        first, last, step = (int(n) for n in numbers[:3])
        names = [fmt % i for i in range(first, last + (1 if step > 0 else -1), step)]
    except (ValueError, TypeError) as exc:
        raise VolumeError(path, f"data file {value!r}: not a readable file-name pattern ({exc})") from None
    return names


def check_detached_data(path: Path) -> None:
    """The data files a MetaImage (``ElementDataFile``) or NRRD (``data file``) header names: ITK
    would read any path, a device, or a pattern it may crash on; see ``_detached_file``."""
    lines = _header_lines(path)
    metaimage = path.name.lower().endswith((".mhd", ".mha"))
    for i, line in enumerate(lines):
        if not metaimage and i and not line.strip():
            return  # NRRD: its fields end at the first blank line
        key, _, value = line.partition("=" if metaimage else ":")
        if key.strip().lower() in (("elementdatafile",) if metaimage else ("data file", "datafile")):
            name = value.strip()
            if name.startswith("LIST"):
                names = [n.strip() for n in lines[i + 1 :] if n.strip()]
            elif "%" in name and metaimage:  # ITK's MetaImage reader can crash on a bad pattern
                raise VolumeError(path, f"{key.strip()} {name!r} is a file-name pattern, which is not read")
            elif "%" in name:
                names = _nrrd_pattern(path, name)
            else:
                names = [name] if name != "LOCAL" else []
            for each in names:
                _detached_file(path, each, key.strip())
            return


def nifti_nonfinite(path: Path, volume_index: int | None) -> int:
    """NaN/Inf voxels stored in a float NIfTI file (ITK's reader silently turns them into 0)."""
    image = nib.load(path)
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return 0
    data = image.dataobj[..., volume_index] if len(image.shape) == 4 else image.dataobj
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(data))))
