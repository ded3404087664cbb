"""The slice-spacing check of a DICOM series: refuse one with a missing, duplicate or misplaced slice.

ITK's series reader only warns about uneven slice positions and puts the slices on a uniform grid
with the spacing of the first two, so every slice past a gap would sit at the wrong place and the
lung volumes would be off. ``slice_positions`` reads each slice's position along the slice normal
from the tags the reader kept; ``check_slice_spacing`` raises a ``VolumeError`` naming the series
folder, the gap and the two files around it. A single slice has no neighbour to measure against,
so ``one_slice_thickness`` gives its SliceThickness tag instead (GDCM reads it as 1 mm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.errors import VolumeError

__all__ = ["check_slice_spacing", "one_slice_thickness", "slice_positions"]


# Consecutive slice gaps may differ from the median gap by this fraction of it (or by SLICE_GAP_FLOOR mm,
# whichever is larger: positions written with two decimals are uneven by up to 0.01 mm).
SLICE_GAP_TOLERANCE = 0.01
SLICE_GAP_FLOOR = 0.01


def _dicom_numbers(text: str, count: int) -> np.ndarray | None:
    """A DICOM decimal-string value of ``count`` numbers (``a\\b\\c``), or None if malformed."""
    try:
        values = np.array([float(v) for v in text.strip().split("\\")], dtype=float)
    except ValueError:
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None


def _mm(value: float) -> str:
    return f"{round(float(value), 3) + 0.0}"  # + 0.0: no "-0.0"


def slice_positions(reader: sitk.ImageSeriesReader, count: int) -> np.ndarray | None:
    """Each slice's ImagePositionPatient (0020|0032) projected on the slice normal of the first
    slice's ImageOrientationPatient (0020|0037), in mm, from the tags the series reader kept (so no
    file is read twice). None when a slice lacks either tag or it cannot be parsed."""

    def tag(index: int, key: str, size: int) -> np.ndarray | None:
        if not reader.HasMetaDataKey(index, key):
            return None
        return _dicom_numbers(reader.GetMetaData(index, key), size)

    orientation = tag(0, "0020|0037", 6)
    if orientation is None:
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return None
    positions = [tag(k, "0020|0032", 3) for k in range(count)]
    if any(p is None for p in positions):
        return None
    return np.asarray(positions) @ (normal / length)


def check_slice_spacing(folder: Path, files: tuple[str, ...], z: np.ndarray | None) -> None:
    """Refuse a DICOM series whose sorted slices are not evenly spaced (a missing or duplicate slice).

    ``z`` holds the slice positions (mm along the slice normal; patient z for axial slices) of
    ``files``, in their order; None (tags missing) or a single slice skips the check. ITK's series
    reader only warns about such a series and puts it on a uniform grid with the spacing of its
    first two slices, so every slice past the gap would sit at the wrong place.
    """
    if z is None or len(z) < 2:
        return
    steps = np.diff(z)
    direction = 1.0 if np.median(steps) >= 0 else -1.0
    gaps = steps * direction  # positive along the series' own order
    median = float(np.median(gaps))
    if median <= SLICE_GAP_FLOOR:  # most slices sit on top of one another
        same = np.flatnonzero(np.abs(gaps) <= SLICE_GAP_FLOOR)
        raise VolumeError(
            folder,
            f"DICOM series slice positions are not evenly spaced: {same.size} of {len(gaps)} slice gaps "
            f"are zero, first at z = {_mm(z[same[0]])} mm (duplicate slices?)",
        )
    tolerance = max(SLICE_GAP_TOLERANCE * median, SLICE_GAP_FLOOR)
    bad = np.flatnonzero(np.abs(gaps - median) > tolerance)
    if bad.size == 0:
        return
    i = int(bad[0])
    gap, between = float(gaps[i]), f"{Path(files[i]).name}, {Path(files[i + 1]).name}"
    if abs(gap) <= SLICE_GAP_FLOOR:
        what = f"two slices at z = {_mm(z[i])} mm ({between}) against gaps of {_mm(median)} mm elsewhere"
        hint = "duplicate slice?"
    else:
        what = (
            f"a gap of {_mm(gap)} mm at z = {_mm(z[i])} to {_mm(z[i + 1])} mm ({between}) "
            f"against {_mm(median)} mm elsewhere"
        )
        multiple = round(gap / median)
        if multiple >= 2 and abs(gap - multiple * median) <= tolerance * multiple:
            hint = "missing slice?" if multiple == 2 else f"{multiple - 1} missing slices?"
        elif gap < 0:
            hint = "slices out of order?"
        else:
            hint = "misplaced slice?" if gap < median else "missing or misplaced slice?"
    more = f"; {bad.size - 1} more uneven gap{'s' if bad.size > 2 else ''}" if bad.size > 1 else ""
    raise VolumeError(
        folder, f"DICOM series slice positions are not evenly spaced: {what} ({hint}){more}{_strays(folder)}"
    )


def _strays(folder: Path) -> str:
    """Name the folder's files that GDCM put in no series (a truncated or damaged slice is left out
    of its series, which then shows a gap), or nothing if there are none."""
    if not folder.is_dir():
        return ""
    placed = {
        Path(name).name
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    }
    strays = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in placed
    )
    if not strays:
        return ""
    shown = ", ".join(strays[:3]) + (f" and {len(strays) - 3} more" if len(strays) > 3 else "")
    return f"; not readable as part of any series: {shown} (truncated or damaged?)"


def one_slice_thickness(reader: sitk.ImageFileReader | sitk.ImageSeriesReader) -> float | None:
    """The SliceThickness (0018|0050) in mm of the first file a reader read, or None without one."""
    key = "0018|0050"
    if isinstance(reader, sitk.ImageSeriesReader):
        text = reader.GetMetaData(0, key) if reader.HasMetaDataKey(0, key) else None
    else:
        text = reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None
    value = _dicom_numbers(text, 1) if text else None
    return float(value[0]) if value is not None and value[0] > 0 else None
