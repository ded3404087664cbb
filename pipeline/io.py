"""Geometry-faithful volume I/O.

``read_volume`` checks a file's header before it reads a voxel (dimensionality, spacing, size), then
reads it with SimpleITK, which handles NIfTI, NRRD, MHA/MHD and DICOM series alike. ``write_like``
writes an array (a mask, a prediction) on a reference image's exact grid: for a NIfTI reference it
reuses that file's own header, so the affine, shape, qform/sform codes and orientation are identical;
for any other reference it copies origin, spacing and direction. Every write is atomic.

Array axis order is (i, j, k): ``volume.array[i, j, k]`` is the voxel that ``volume.affine`` maps to
RAS+ millimetres, exactly as nibabel would present it.

Example:
    >>> vol = read_volume("scan.nii.gz")                            # doctest: +SKIP
    >>> write_like((vol.array > -400).astype("uint8"), vol, "body.nii.gz")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from pipeline import file_checks
from pipeline.dicom_spacing import check_slice_spacing, one_slice_thickness, slice_positions
from pipeline.errors import VolumeError
from pipeline.nifti_gzip import gzip_bytes, read_plain_nifti_gz
from pipeline.sitk_buffer import array_view

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "IMAGE_SUFFIXES",
    "Header",
    "Volume",
    "VolumeError",
    "atomic_path",
    "float_text",
    "is_nifti",
    "read_header",
    "read_volume",
    "remove_stale_temps",
    "save_nifti",
    "sitk_affine",
    "write_json",
    "write_like",
]

DEFAULT_MAX_VOXELS = 1_000_000_000
# Flips between ITK's LPS+ physical space and the RAS+ space of NIfTI affines.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# The ITK readers of the scan formats medpipe takes; a PNG, JPEG, TIFF or BMP carries neither the
# scanner's intensities nor the patient's geometry, so a CT net's output on it would mean nothing.
SCAN_IMAGE_IOS = ("NiftiImageIO", "NrrdImageIO", "MetaImageIO", "GDCMImageIO")


def is_nifti(path: str | os.PathLike) -> bool:
    """True if the path has a NIfTI suffix (.nii or .nii.gz)."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


@dataclass(frozen=True)
class Header:
    """What a file's header says, read without touching voxel data."""

    path: Path
    size: tuple[int, ...]  # ITK index order (i, j, k[, t])
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_type: str
    components: int
    dicom_files: tuple[str, ...] = ()

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.int64))


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """The 4x4 voxel-to-RAS+ affine of a 3D SimpleITK image (nibabel's convention)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return affine


@dataclass
class Volume:
    """A 3D scalar volume with its geometry of record (the SimpleITK image)."""

    image: sitk.Image
    path: Path

    @property
    def array(self) -> np.ndarray:
        """A read-only (i, j, k) view of the voxels (no copy); it keeps the image alive."""
        return array_view(self.image)

    @property
    def affine(self) -> np.ndarray:
        return sitk_affine(self.image)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.GetSize())  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.image.GetSpacing())  # type: ignore[return-value]

    @property
    def axcodes(self) -> tuple[str, str, str]:
        return nib.aff2axcodes(self.affine)


def _first_line(exc: Exception) -> str:
    """The informative part of a SimpleITK exception (its messages span many lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "Description:" in ln or "ERROR" in ln.upper()]
    text = (useful or lines or [type(exc).__name__])[-1]
    return text.split("Description:")[-1].strip()[:300]


def _dicom_series(folder: Path, series_uid: str | None) -> tuple[str, ...]:
    """The sorted file names of one DICOM series in a folder."""
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise VolumeError(folder, "folder holds no readable DICOM series")
    if series_uid is None:
        if len(uids) > 1:
            raise VolumeError(
                folder,
                f"folder holds {len(uids)} DICOM series; pick one (manifest column series_uid): {list(uids)}",
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise VolumeError(folder, f"DICOM series {series_uid} not found (found {list(uids)})")
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def read_header(path: str | os.PathLike, series_uid: str | None = None) -> Header:
    """Read a file's (or DICOM series') header only; raise VolumeError if it is unreadable."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(path, "file not found")
    files: tuple[str, ...] = ()
    if path.is_dir():
        files = _dicom_series(path, series_uid)
        info_file = files[0]
    else:
        if path.stat().st_size == 0:
            raise VolumeError(path, "empty file (0 bytes)")
        info_file = str(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(info_file)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        problem = (
            file_checks.gzip_problem(path, None) if path.is_file() and file_checks.is_gzip(path) else None
        )
        raise VolumeError(path, problem or f"not a readable image ({_first_line(exc)})") from exc
    image_io = sitk.ImageFileReader.GetImageIOFromFileName(info_file)
    if image_io not in SCAN_IMAGE_IOS:
        raise VolumeError(
            path,
            f"a {image_io.removesuffix('ImageIO')} image holds no scanner intensities or patient "
            "geometry; give a NIfTI, NRRD/MHA or DICOM scan",
        )
    if not files and is_nifti(path):
        file_checks.check_nifti_header(path)
    elif not files and path.name.lower().endswith((".mhd", ".mha", ".nhdr", ".nrrd")):
        file_checks.check_detached_data(path)
    size = tuple(int(s) for s in reader.GetSize())
    spacing = tuple(float(s) for s in reader.GetSpacing())
    if files:  # one file per slice: the header of the first file is 2D or a one-slice 3D
        size = (*size[:2], len(files))
        spacing = (*spacing[:2], spacing[2] if len(spacing) > 2 else 1.0)
    return Header(
        path=path,
        size=size,
        spacing=spacing,
        origin=tuple(reader.GetOrigin()),
        direction=tuple(reader.GetDirection()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        components=int(reader.GetNumberOfComponents()),
        dicom_files=files,
    )


def check_header(
    header: Header,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    allow_2d: bool = False,
    volume_index: int | None = None,
) -> None:
    """Refuse a header that cannot give a sane 3D volume, before any voxel is read."""
    path, size = header.path, header.size
    if header.components != 1:
        raise VolumeError(path, f"{header.components}-component (RGB/vector) image; a scalar image is needed")
    if header.dimension not in (2, 3, 4):
        raise VolumeError(path, f"{header.dimension}D image is not supported")
    if header.dimension == 4 and volume_index is None:
        raise VolumeError(
            path, f"4D image {size}: pick a volume index with io.volume_index (predict: --volume-index)"
        )
    if header.dimension == 4 and not 0 <= volume_index < size[3]:  # type: ignore[operator]
        raise VolumeError(path, f"volume index {volume_index} is outside 0..{size[3] - 1}")
    if any(s < 1 for s in size):
        raise VolumeError(path, f"empty image size {size}")
    spatial = size[:3]
    flat = header.dimension == 2 or min(spatial) == 1
    if flat and not allow_2d:
        raise VolumeError(path, f"2D image {size}: set io.allow_2d to treat it as a one-slice volume")
    spacing = np.asarray(header.spacing[:3], dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise VolumeError(path, f"spacing {tuple(spacing)} is not finite and positive")
    n = int(np.prod(spatial, dtype=np.int64))
    if n > max_voxels:
        raise VolumeError(path, f"{n:,} voxels {spatial} exceed the limit of {max_voxels:,} (io.max_voxels)")
    _check_nifti_slice_plane(header)
    direction = np.asarray(header.direction, dtype=float)
    dim = header.dimension
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction.reshape(dim, dim))) < 1e-6:
        raise VolumeError(path, "direction cosines are not finite or singular")


def _execute(path: Path, header: Header, volume_index: int | None) -> sitk.Image:
    """Read the voxels of a checked header into a 3D SimpleITK image (a DICOM series: evenly spaced)."""
    z = None  # a DICOM series' slice positions
    try:
        if header.dicom_files:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(header.dicom_files))
            reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags for the spacing check: free
            image = reader.Execute()
            z = slice_positions(reader, len(header.dicom_files))
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            if header.dimension == 4:  # extract one volume while reading; a size of 0 drops the axis
                reader.SetExtractIndex([0, 0, 0, int(volume_index or 0)])
                reader.SetExtractSize([*header.size[:3], 0])
            image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(path, f"truncated or corrupt image data ({_first_line(exc)})") from exc
    check_slice_spacing(path, header.dicom_files, z)
    if image.GetDimension() == 3 and image.GetSize()[2] == 1 and (thickness := one_slice_thickness(reader)):
        image.SetSpacing((*image.GetSpacing()[:2], thickness))  # a lone DICOM slice: GDCM says 1 mm
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
        if is_nifti(path):
            _set_nifti_geometry(image, path)
    return image


def _nifti_affine(path: Path) -> tuple[nib.Nifti1Header, np.ndarray | None]:
    """A NIfTI file's header and its 3D affine, or None for the affine without a qform or sform
    (both codes 0). For a 2D file this is what ITK does not give: it reads the plane alone."""
    header = nib.load(path).header
    placed = header["sform_code"] > 0 or header["qform_code"] > 0
    return header, header.get_best_affine() if placed else None


def _set_nifti_geometry(image: sitk.Image, path: Path) -> None:
    """Give a 2D NIfTI slice, joined into one slice of 3D, the header's whole affine: ITK reads the
    plane alone, so its slab thickness (pixdim[3]) and position along the third axis would be lost.
    Without a qform or sform (both codes 0) ITK's own plane stays, and only the thickness is set."""
    header, affine = _nifti_affine(path)
    if affine is None:
        thickness = float(header["pixdim"][3])
        if np.isfinite(thickness) and thickness > 0:
            image.SetSpacing((*image.GetSpacing()[:2], thickness))
        return
    axes = LPS_TO_RAS @ affine[:3, :3]  # the flip is its own inverse: RAS+ -> ITK's LPS
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((axes / spacing).ravel().tolist())
    image.SetOrigin((LPS_TO_RAS @ affine[:3, 3]).tolist())


def _check_slice_plane(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Refuse a one-slice volume whose slice is not axial: a one-slice image gives only an axial
    view, and the lung net segments axial slices, so a coronal or sagittal slice would be cut across."""
    flat = [axis for axis, n in enumerate(shape) if n == 1]
    if not flat or len(flat) == 3:
        return
    world = nib.orientations.io_orientation(affine)[:, 0].astype(int)  # 0 R-L, 1 A-P, 2 S-I
    if any(world[axis] == 2 for axis in flat):
        return
    plane = "coronal" if any(world[axis] == 1 for axis in flat) else "sagittal"
    raise VolumeError(
        path,
        f"a single {plane} slice {shape} ({''.join(nib.aff2axcodes(affine))}): one-slice images are "
        "taken as axial slices only",
    )


def _check_nifti_slice_plane(header: Header) -> None:
    """The slice-plane check of a 2D NIfTI from its own affine, before reading: ITK takes the
    affine's in-plane corner as the direction, which is singular for a coronal or sagittal slice."""
    if header.dimension == 2 and not header.dicom_files and is_nifti(header.path):
        affine = _nifti_affine(header.path)[1]
        if affine is not None:
            _check_slice_plane(header.path, (*header.size, 1), affine)


def _read_nifti_gz(path: Path, header: Header) -> sitk.Image | None:
    """A plain 3D .nii.gz read through the ISA-L fast path, on SimpleITK's geometry; else None."""
    if header.dimension != 3 or header.dicom_files or not file_checks.is_gzip(path):
        return None
    image = read_plain_nifti_gz(path, header.pixel_type)
    if image is None:
        return None
    image.SetOrigin(header.origin)
    image.SetSpacing(header.spacing)
    image.SetDirection(header.direction)
    return image


def _check_finite(
    image: sitk.Image, path: Path, nonfinite: str, stored_values: bool, volume_index: int | None = None
) -> sitk.Image:
    """Raise on NaN/Inf voxels, or replace them with 0 when ``nonfinite == "zero"``.

    ``stored_values`` says the image holds the file's values as stored; otherwise it came from ITK's
    NIfTI reader, which has already turned NaN/Inf into 0, so a NIfTI file with zeros is re-read.
    """
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return image
    view = sitk.GetArrayViewFromImage(image)
    bad = int(np.count_nonzero(~np.isfinite(view)))
    if bad == 0 and not stored_values and is_nifti(path) and path.is_file() and not view.all():
        bad = file_checks.nifti_nonfinite(path, volume_index)
        if bad and nonfinite == "zero":
            return image
    if bad == 0:
        return image
    if nonfinite != "zero":
        raise VolumeError(
            path,
            f"{bad:,} NaN/Inf voxels (read them as 0 with io.nonfinite: zero; predict: --nonfinite zero)",
        )
    fixed = sitk.GetImageFromArray(np.nan_to_num(view, nan=0.0, posinf=0.0, neginf=0.0))
    fixed.CopyInformation(image)
    return fixed


def read_volume(
    path: str | os.PathLike,
    *,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    allow_2d: bool = False,
    volume_index: int | None = None,
    nonfinite: str = "error",
    series_uid: str | None = None,
) -> Volume:
    """Read a 3D volume (file or DICOM series folder) after checking its header.

    Raises VolumeError naming the file for: missing or empty files, non-images, corrupt or truncated
    data, unsupported dimensionality, bad spacing, oversize headers, NaN/Inf voxels and one-slice
    images that are not axial.
    """
    path = Path(path)
    header = read_header(path, series_uid)
    check_header(header, max_voxels=max_voxels, allow_2d=allow_2d, volume_index=volume_index)
    image = _read_nifti_gz(path, header) if is_nifti(path) else None
    stored_values = image is not None
    if image is None:
        if not header.dicom_files and is_nifti(path):
            file_checks.check_nifti_data(path)
        image = _execute(path, header, volume_index)
    volume = Volume(_check_finite(image, path, nonfinite, stored_values, volume_index), path)
    _check_slice_plane(volume.path, volume.shape, volume.affine)
    return volume


def _file_mode() -> int:
    """The mode a plain ``open`` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
TEMP_MARK = ".medpipe-tmp"  # in every temporary name, so a cleanup cannot take a case's own file


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary name keeps the final suffixes so that format-sniffing writers behave. The file
    gets the mode the umask gives any new file (``mkstemp``'s own is owner-only), so results on
    shared storage stay readable by the group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    # a name near the file system's 255-byte limit gets a short hashed stem, or the temporary one
    # (about 30 bytes longer) could not be created where the final one can
    stem = path.name if len(path.name.encode()) <= 200 else hashlib.sha1(path.name.encode()).hexdigest()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{TEMP_MARK}{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float, however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def float_text(value: float) -> str:
    """A float as CSV text that reads back as the same float (shortest repr): a probability written
    to a few decimals can print equal to a threshold it is below, contradicting its prediction."""
    return repr(float(value))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as strict JSON (an undefined metric, NaN, becomes null), atomically."""
    text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the half-written files (``atomic_path`` temporaries) a killed run left below ``folder``.

    Call it when a stage starts on its output folder, before any worker writes there.
    Returns how many were removed.
    """
    folder = Path(folder)
    stale = [p for p in folder.rglob(f".*{TEMP_MARK}*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray | None,
    header: nib.Nifti1Header | None = None,
    compresslevel: int = 1,
) -> Path:
    """Write an (i, j, k) array as NIfTI atomically, gzipped by ISA-L (levels 0-3) for a .gz path.

    With ``affine=None`` the given header's qform/sform (and their codes) are kept as they are.
    The gzip stream has a zero timestamp, so identical inputs give byte-identical files.
    """
    image = nib.Nifti1Image(array, affine, header=header)
    if affine is not None:  # a new image: qform and sform both say "scanner", as CT viewers expect
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    image.header.set_data_dtype(array.dtype)
    image.header["scl_slope"], image.header["scl_inter"] = np.nan, np.nan
    payload = image.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip_bytes(payload, compresslevel)
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def write_like(
    array: np.ndarray,
    reference: Volume | str | os.PathLike,
    path: str | os.PathLike,
) -> Path:
    """Write an (i, j, k) array on the reference image's exact grid, atomically.

    A NIfTI reference lends its own header (affine, qform/sform codes, units), so the output opens
    aligned in any viewer. Other references (NRRD, MHA, DICOM) lend origin, spacing and direction.
    """
    ref_path = reference.path if isinstance(reference, Volume) else Path(reference)
    if is_nifti(ref_path) and ref_path.is_file():
        ref_header = nib.load(ref_path).header
        ref_shape = tuple(int(s) for s in ref_header.get_data_shape()[:3])
        if len(ref_shape) < 3 and array.shape[len(ref_shape) :] == (1,) * (3 - len(ref_shape)):
            array = np.asarray(array).reshape(ref_shape)  # a 2D file's mask keeps its two axes
        _check_shape(array, ref_shape, ref_path)
        header = ref_header.copy()
        header["descrip"] = b"medpipe"
        return save_nifti(path, np.asarray(array), None, header=header)
    volume = reference if isinstance(reference, Volume) else read_volume(ref_path, allow_2d=True)
    _check_shape(array, volume.shape, ref_path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    image.CopyInformation(volume.image)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), True, 1)
    return Path(path)


def _check_shape(array: np.ndarray, shape: tuple[int, ...], ref_path: Path) -> None:
    if tuple(array.shape) != tuple(shape):
        raise VolumeError(ref_path, f"array shape {tuple(array.shape)} does not match reference grid {shape}")
