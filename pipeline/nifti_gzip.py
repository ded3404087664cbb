"""Fast reading and writing of gzip-compressed NIfTI (.nii.gz) with ISA-L.

Inflating the gzip stream is most of the cost of reading a CT scan: for a noisy 512x512x300 int16
volume, ITK's bundled zlib takes about 0.6 s of a 0.65 s read, while ISA-L's inflate
(https://github.com/intel/isa-l, via the ``isal`` bindings) does the same in about 0.33 s.
``read_plain_nifti_gz`` covers the common case only: a single-volume, unscaled, native-endian
NIfTI whose voxel type maps to a SimpleITK pixel type. It returns None for anything else, so the
caller falls back to SimpleITK's reader. The caller takes the geometry from SimpleITK's own header
parse, so the image built from these voxels is the one ``sitk.ReadImage`` would give, voxel for
voxel; unlike ITK, a truncated stream raises instead of being zero-filled, and NaN/Inf voxels are
kept for the caller to judge.
"""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from isal import igzip, isal_zlib

from pipeline.errors import VolumeError
from pipeline.file_checks import INFLATE_STEP, MAX_TRAILING, trailing_problem
from pipeline.sitk_buffer import writable_bytes

__all__ = ["gzip_bytes", "read_plain_nifti_gz"]

CHUNK = 1 << 21  # compressed bytes handed to the decoder at a time

# The NIfTI voxel types SimpleITK reads without conversion, as the pixel types it reports for them.
PIXEL_IDS = {
    np.dtype(np.uint8): sitk.sitkUInt8,
    np.dtype(np.int8): sitk.sitkInt8,
    np.dtype(np.uint16): sitk.sitkUInt16,
    np.dtype(np.int16): sitk.sitkInt16,
    np.dtype(np.uint32): sitk.sitkUInt32,
    np.dtype(np.int32): sitk.sitkInt32,
    np.dtype(np.uint64): sitk.sitkUInt64,
    np.dtype(np.int64): sitk.sitkInt64,
    np.dtype(np.float32): sitk.sitkFloat32,
    np.dtype(np.float64): sitk.sitkFloat64,
}


def gzip_bytes(payload: bytes, compresslevel: int = 1) -> bytes:
    """Gzip ``payload`` with ISA-L (levels 0-3) and a zero timestamp, so equal inputs give equal files."""
    return igzip.compress(payload, compresslevel=compresslevel, mtime=0)


def _plain_header(raw: bytes) -> nib.Nifti1Header | None:
    """The NIfTI-1 header at the start of ``raw`` if the fast path can take its voxels, else None."""
    try:
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    except Exception:  # not NIfTI-1 (NIfTI-2, or not NIfTI at all): SimpleITK decides
        return None
    dtype = header.get_data_dtype()
    if header["dim"][0] != 3 or not dtype.isnative or dtype.newbyteorder("=") not in PIXEL_IDS:
        return None
    if header.get_slope_inter() not in ((None, None), (1.0, 0.0)):
        return None  # ITK would rescale to float
    return header


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` once the reader has room for it; False if the reader stopped first."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _inflate(compressed: memoryview, out: queue.Queue, stop: threading.Event) -> None:
    """Inflate every gzip member of ``compressed``, at most ``INFLATE_STEP`` bytes at a time, into
    ``out`` (bounded: a decompression bomb cannot run ahead of the reader); then put None, or the
    exception that stopped it (EOFError for a stream cut short)."""
    try:
        decoder = isal_zlib.decompressobj(wbits=31)
        for start in range(0, len(compressed), CHUNK):
            chunk: bytes | memoryview = compressed[start : start + CHUNK]
            while len(chunk):
                if not _put(out, decoder.decompress(chunk, INFLATE_STEP), stop):
                    return
                if decoder.unconsumed_tail:
                    chunk = decoder.unconsumed_tail
                    continue
                chunk = decoder.unused_data if decoder.eof else b""
                if len(chunk):  # a further member (concatenated gzip files are legal)
                    decoder = isal_zlib.decompressobj(wbits=31)
        if not decoder.eof:
            raise EOFError("the stream ends before its end marker")
    except Exception as exc:  # handed to the reading thread, which raises it
        _put(out, exc, stop)
    _put(out, None, stop)


class _Chunks:
    """The inflated chunks of a .nii.gz file, produced by a background thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.stop = threading.Event()
        self.worker = threading.Thread(
            target=_inflate, args=(memoryview(path.read_bytes()), self.queue, self.stop), daemon=True
        )
        self.worker.start()

    def next(self) -> bytes | None:
        """The next inflated chunk, or None at the end; raises VolumeError for a bad stream."""
        item = self.queue.get()
        if isinstance(item, EOFError):
            raise VolumeError(self.path, f"truncated gzip data ({item})") from item
        if isinstance(item, Exception):
            raise VolumeError(self.path, f"corrupt gzip data ({item})") from item
        return item

    def close(self) -> None:
        self.stop.set()
        self.worker.join()


def read_plain_nifti_gz(path: Path, pixel_type: str) -> sitk.Image | None:
    """The voxels of a .nii.gz as a SimpleITK image without geometry, or None if the fast path does
    not apply.

    ``pixel_type`` is the SimpleITK pixel type that SimpleITK's header read reported; the fast path
    applies only when the stored voxel type is that type. A background thread inflates the stream in
    chunks while this one allocates the image and copies each chunk into it, so the copy costs no
    extra time. Raises VolumeError for a corrupt or truncated gzip stream, or too few voxel bytes.
    """
    chunks = _Chunks(path)
    try:
        head = b""
        while len(head) < 348 and (chunk := chunks.next()) is not None:
            head += chunk
        header = _plain_header(head)
        if header is None:
            return None
        dtype = header.get_data_dtype().newbyteorder("=")
        if sitk.GetPixelIDValueAsString(PIXEL_IDS[dtype]) != pixel_type:
            return None
        size = [int(n) for n in header.get_data_shape()]
        offset, needed = int(header["vox_offset"]), int(np.prod(size, dtype=np.int64)) * dtype.itemsize
        image = sitk.Image(size, PIXEL_IDS[dtype])
        target, skip, filled = writable_bytes(image), offset, 0
        chunk, trailing = head, 0
        while chunk is not None:
            data = np.frombuffer(chunk, np.uint8)[skip:]
            skip -= min(skip, len(chunk))
            take = min(len(data), needed - filled)
            target[filled : filled + take] = data[:take]
            filled += take
            trailing += len(data) - take
            if trailing > MAX_TRAILING:  # the rest of the stream is read to check it, but not forever
                raise VolumeError(path, trailing_problem())
            chunk = chunks.next()
    finally:
        chunks.close()
    if filled < needed:
        raise VolumeError(path, f"truncated data ({offset + filled:,} of {offset + needed:,} bytes)")
    return image
