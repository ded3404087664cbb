"""The predict-segment stage: lung masks in each input's own grid, and lung volumes.

``run_predict_segment`` takes a file (NIfTI, NRRD, MHA, a 2D image), a folder (every image file and
DICOM series below it, ``pipeline.manifest.discover_folder``) or a manifest CSV. For each case it
reads the scan, runs its axial slices through the net in batches (``segment_volume``),
post-processes the mask (``pipeline.segment.postprocess``) and writes it with ``io.write_like`` on the
input's exact grid: same shape, affine, orientation and header. It writes::

    OUT/masks/<case_id>.nii.gz   uint8: right lung 1, left lung 2 (or 1 for both if label_sides is off)
    OUT/volumes.csv              case_id, right_ml, left_ml, total_ml, status, reason
    OUT/ledger.csv               case_id, status, reason, seconds, output (pipeline.batch)

A rerun skips the cases whose ledger row is ``ok`` and whose mask exists; a corrupt scan gets an
``error`` row and the batch goes on.

Several model folders (nets trained with the same slice parameters, e.g. different seeds) make an
ensemble: each slice is scored by the mean of the nets' probabilities (``pipeline.models.ensemble``),
at the sum of their times; post-processing follows the first folder's settings.

Example:
    >>> out = run_predict_segment(Path("runs/demo/segment"), Path("scans/"), Path("out/"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.batch import ResultTable, Row, case_signature, run_into_table
from pipeline.checkpoint import load_checkpoint, read_task_sidecar
from pipeline.config import IOConfig, SegmentConfig
from pipeline.folder_lock import folder_lock
from pipeline.io import Volume, read_volume, remove_stale_temps, write_like
from pipeline.manifest import Case, input_cases
from pipeline.models.ensemble import Ensemble
from pipeline.models.lung_unet import build_lung_unet
from pipeline.segment.postprocess import lung_volumes, postprocess
from pipeline.segment.slices import (
    SliceParams,
    canonical_spacing,
    from_canonical,
    prepare_slices,
    restore_slices,
)
from pipeline.train.segment import axial_stack, predict_slices

__all__ = [
    "VOLUME_COLUMNS",
    "Segmenter",
    "input_cases",
    "load_segmenter",
    "predict_case",
    "run_predict_segment",
    "segment_volume",
]

VOLUME_COLUMNS = ("case_id", "right_ml", "left_ml", "total_ml", "status", "reason")


@dataclass
class Segmenter:
    """A trained net with the slice parameters, post-processing and read settings it was trained with."""

    model: nn.Module
    params: SliceParams
    settings: SegmentConfig
    io: IOConfig


@functools.lru_cache(maxsize=8)  # a net is a few MB; an ensemble's members stay cached beside it
def _load_checkpoint(model_dir: Path) -> Segmenter:
    """``model_dir/checkpoint.pt`` (weights only) and its sidecar's settings; cached per process."""
    path = Path(model_dir) / "checkpoint.pt"
    meta = read_task_sidecar(path, "segment")
    model = build_lung_unet(**meta["model"])
    load_checkpoint(path, model)
    settings = SegmentConfig.model_validate(meta["config"]["segment"])
    io = IOConfig.model_validate(meta["config"].get("io", {}))
    return Segmenter(model.eval(), SliceParams.from_dict(meta["slice_params"]), settings, io)


def _model_dirs(model_dir: Path | Sequence[Path]) -> tuple[Path, ...]:
    """One folder or several, as a non-empty tuple of resolved paths."""
    dirs = (model_dir,) if isinstance(model_dir, (str, Path)) else tuple(model_dir)
    if not dirs:
        raise ValueError("no model folder given")
    return tuple(Path(d).resolve() for d in dirs)


@functools.lru_cache(maxsize=2)
def _load_ensemble(model_dirs: tuple[Path, ...]) -> Segmenter:
    """The nets of several folders as one mean-probability ensemble (same slice parameters)."""
    members = [_load_checkpoint(d) for d in model_dirs]
    first = members[0]
    for path, member in zip(model_dirs[1:], members[1:], strict=True):
        if member.params != first.params:
            raise ValueError(
                f"{path}: its slice parameters {member.params} differ from {model_dirs[0]}'s {first.params}; "
                "an ensemble needs nets trained on the same slices"
            )
    return Segmenter(Ensemble(m.model for m in members).eval(), first.params, first.settings, first.io)


def load_segmenter(model_dir: Path | Sequence[Path], flip_tta: bool | None = None) -> Segmenter:
    """The trained net of ``model_dir`` (loaded once per process) with its settings.

    Several folders give their ensemble (module docstring). ``flip_tta`` overrides the checkpoint's
    ``segment.flip_tta`` (None keeps it); the override shares the cached net.
    """
    dirs = _model_dirs(model_dir)
    segmenter = _load_checkpoint(dirs[0]) if len(dirs) == 1 else _load_ensemble(dirs)
    if flip_tta is None or flip_tta == segmenter.settings.flip_tta:
        return segmenter
    return replace(segmenter, settings=segmenter.settings.model_copy(update={"flip_tta": flip_tta}))


def _tick(timings: MutableMapping[str, float] | None, stage: str, start: float) -> float:
    now = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + now - start
    return now


def _lungs_and_body(
    segmenter: Segmenter,
    stack: np.ndarray,
    timings: MutableMapping[str, float] | None,
    pixel_mm: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Binary lung and body masks (S, H, W) of an axial stack with (H, W) pixel spacing ``pixel_mm``.
    The net's inputs and scores are freed on return, so post-processing reuses their memory instead
    of touching fresh pages."""
    start = time.perf_counter()
    prepared = prepare_slices(stack, segmenter.params, pixel_mm)
    start = _tick(timings, "prepare", start)
    s = segmenter.settings
    with torch.inference_mode():
        scores = predict_slices(segmenter.model, prepared.images, s.infer_batch, s.precision, s.flip_tta)
    start = _tick(timings, "net", start)
    lungs = restore_slices(scores, prepared.boxes, stack.shape[1:])
    _tick(timings, "restore", start)
    return lungs, prepared.body


def segment_volume(
    segmenter: Segmenter, volume: Volume, timings: MutableMapping[str, float] | None = None
) -> np.ndarray:
    """Post-processed uint8 lung labels on the volume's own (i, j, k) grid.

    ``timings``, if given, accumulates seconds per stage: prepare, net, restore, postprocess.
    """
    affine = volume.affine
    pixel_mm = canonical_spacing(affine)[:2]
    lungs, body = _lungs_and_body(segmenter, axial_stack(volume.array, affine), timings, pixel_mm)
    start = time.perf_counter()
    s = segmenter.settings
    labels = postprocess(
        from_canonical(lungs.transpose(1, 2, 0), affine),
        affine,
        from_canonical(body.transpose(1, 2, 0), affine),
        image=volume.array,
        keep=s.keep_components,
        max_hole_mm2=s.max_hole_mm2,
        min_aerated=s.min_aerated,
        label_sides=s.label_sides,
    )
    _tick(timings, "postprocess", start)
    return labels


def predict_case(payload: tuple[tuple[Path, ...], Case, Path, bool | None, IOConfig]) -> Row:
    """Segment one case and write its mask; the row's ``extra`` holds the volumes (top-level: picklable).

    The scan is read with ``io``'s options, and 2D single slices are always accepted.
    """
    model_dirs, case, out, flip_tta, io = payload
    if case.problem:
        raise ValueError(case.problem)
    start = time.perf_counter()
    segmenter = load_segmenter(model_dirs, flip_tta)
    volume = read_volume(
        case.image,
        max_voxels=io.max_voxels,
        allow_2d=True,
        volume_index=io.volume_index,
        nonfinite=io.nonfinite,
        series_uid=case.series_uid,
    )
    labels = segment_volume(segmenter, volume)
    path = write_like(labels, volume, out / "masks" / f"{case.case_id}.nii.gz")
    volumes = lung_volumes(labels, volume.affine, sides=segmenter.settings.label_sides)
    return Row(case.case_id, "ok", "", time.perf_counter() - start, str(path), extra=volumes)


def _volume_row(row: Row) -> dict[str, str]:
    vols = row.extra or {}
    # an empty cell where a volume is not measured (right/left with label_sides off), not "nan"
    fmt = {k: f"{v:.3f}" if math.isfinite(v := vols.get(k, math.nan)) else "" for k in VOLUME_COLUMNS[1:4]}
    return {**fmt, "status": row.status, "reason": row.reason}


def run_predict_segment(
    model_dir: Path | Sequence[Path],
    inputs: Path,
    out: Path,
    workers: int = 0,
    scheduler: str | None = None,
    flip_tta: bool | None = None,
    io: Mapping[str, object] | None = None,
) -> Path:
    """Segment every input case into ``out`` (see the module docstring); return ``out``.

    ``workers`` local processes, or the Dask cluster at ``scheduler`` (see ``pipeline.batch``).
    Several ``model_dir`` folders predict as one ensemble. ``flip_tta`` overrides the checkpoint's
    ``segment.flip_tta`` (``load_segmenter``), ``io`` its ``io`` read options (e.g. ``volume_index``
    for 4D scans, ``nonfinite: zero``).
    """
    model_dirs, out = _model_dirs(model_dir), Path(out)
    with contextlib.ExitStack() as locks:
        for folder in model_dirs:
            if folder != out.resolve():  # --out as a model folder: the exclusive lock covers it
                locks.enter_context(folder_lock(folder, shared=True))
        locks.enter_context(folder_lock(out))
        segmenter = load_segmenter(model_dirs, flip_tta)  # fail early on a missing or broken checkpoint
        read = IOConfig.model_validate({**segmenter.io.model_dump(), **(io or {})})
        remove_stale_temps(out)
        cases = input_cases(inputs, out)
        table = ResultTable(out / "volumes.csv", VOLUME_COLUMNS, [c.case_id for c in cases])
        # a rerun redoes a case whose scan, nets or settings changed since it was done
        base = case_signature(
            segmenter.settings.model_dump_json() + read.model_dump_json(),
            [d / "checkpoint.pt" for d in model_dirs],
        )
        run_into_table(
            predict_case,
            {c.case_id: (model_dirs, c, out, flip_tta, read) for c in cases},
            table,
            _volume_row,
            out / "ledger.csv",
            desc="segment",
            workers=workers,
            scheduler=scheduler,
            finished=lambda cid: (out / "masks" / f"{cid}.nii.gz").is_file(),
            signatures={c.case_id: case_signature(base, (c.image,)) for c in cases},
        )
        return out
