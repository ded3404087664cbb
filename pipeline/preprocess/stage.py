"""The preprocess stage: cases -> ``RUN/preprocess/{cache/*.npz, ledger.csv, cases.csv, ...}``.

Per case (``preprocess_volume``): plan the RAS output grid over the foreground, resample image and
mask onto it in one pass, normalise intensities, cut the three orthogonal views. Per run
(``run_preprocess``): validate the manifest or discover the folder, make the split if there is
none, run the cases (serially or on local processes), skip those whose cache entry is still valid,
and write the ledger, ``cases.csv``, ``params.json`` and ``fingerprint.json``.

Example:
    >>> out = run_preprocess(load_config("cfg.yaml"))   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.batch import Ledger, Row, Task, case_signature, run_cases
from pipeline.config import Config, IOConfig, PreprocessConfig, save_config
from pipeline.folder_lock import folder_lock
from pipeline.io import Volume, VolumeError, atomic_path, read_volume, remove_stale_temps, write_json
from pipeline.manifest import Case, CaseSet, assign_splits, discover_folder, read_manifest
from pipeline.preprocess.cache import load_meta, save_entry, valid_entry
from pipeline.preprocess.fingerprint import fingerprint
from pipeline.preprocess.intensity import (
    background_value,
    foreground_threshold,
    normalize,
    smooth,
    surface_distance,
)
from pipeline.preprocess.spatial import plan_grid, resample
from pipeline.preprocess.views import center_index, extract_views, point_index

__all__ = [
    "load_cases",
    "mask_requirement",
    "preprocess_volume",
    "read_case",
    "run_preprocess",
]

CASE_COLUMNS = ("case_id", "label", "label_name", "split", "patient_id", "image", "mask", "cache", "status")


def _inside(labels: np.ndarray, margin_mm: float, spacing: np.ndarray) -> np.ndarray:
    """The mask's voxels, less those within ``margin_mm`` of a voxel outside it.

    An erosion by the ellipsoid of voxel offsets at most ``margin_mm`` long: the same voxels as
    keeping those whose distance transform exceeds the margin, about ten times faster.
    """
    inside = labels > 0
    if margin_mm > 0:
        step = np.asarray(spacing, dtype=float)
        reach = np.floor(margin_mm / step).astype(int)
        offsets = np.indices(2 * reach + 1) - reach[:, None, None, None]
        ball = ((offsets * step[:, None, None, None]) ** 2).sum(axis=0) <= margin_mm**2
        inside = ndimage.binary_erosion(inside, ball, border_value=1)
    return inside


def mask_requirement(cfg: PreprocessConfig) -> str | None:
    """Why these parameters need every case's mask, or None. (``views.center: mask`` does not: a
    case without one is cut through the volume centre.)"""
    return "views.within_mask is set" if cfg.views.within_mask else None


def _labels(resampled: np.ndarray, path: Path) -> np.ndarray:
    """A resampled mask as the smallest unsigned integer type that holds its labels (uint8 for
    most; an atlas's labels in the thousands keep theirs instead of wrapping round)."""
    low, top = float(resampled.min()), float(resampled.max())
    if low < 0 or top >= 2**32:
        raise VolumeError(path, f"mask labels {low:g}..{top:g} are outside 0..{2**32 - 1}")
    dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
    return resampled.astype(dtype)


def preprocess_volume(
    volume: Volume, mask: Volume | None, cfg: PreprocessConfig
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Preprocess one read volume (and its mask): the cache arrays and per-case statistics."""
    if mask is not None and mask.shape != volume.shape:
        raise VolumeError(mask.path, f"mask shape {mask.shape} does not match the image's {volume.shape}")
    if mask is not None and not np.allclose(mask.affine, volume.affine, atol=1e-3):
        origins = [np.round(v.affine[:3, 3], 2).tolist() for v in (mask, volume)]
        raise VolumeError(
            mask.path,
            f"mask affine differs from the image's by up to {np.abs(mask.affine - volume.affine).max():.3g} "
            f"mm on the same {mask.shape} grid (origin {origins[0]} against {origins[1]})",
        )
    threshold = foreground_threshold(cfg.intensity, cfg.foreground_threshold, volume.array)
    grid = plan_grid(volume, cfg, threshold)
    raw = resample(volume.image, grid, linear=True, fill=background_value(cfg.intensity, volume.array))
    foreground = raw > threshold
    scaled = normalize(raw, cfg.intensity, foreground)
    shape_mask = scaled >= 0.5 if cfg.views.distance else None  # a binary shape's half level
    image = smooth(scaled, cfg.intensity.smooth_mm, grid.spacing)
    labels = None if mask is None else _labels(resample(mask.image, grid, linear=False, fill=0), mask.path)

    vcfg = cfg.views
    if vcfg.center == "point" and vcfg.point is not None:
        index = point_index(vcfg.point, grid.affine)
        if np.any(index < -0.5) or np.any(index > np.array(image.shape[:3]) - 0.5):
            raise VolumeError(
                volume.path,
                f"views.point {list(vcfg.point)} (RAS mm) lies outside the preprocessed grid (voxel "
                f"{np.round(index, 1).tolist()} of {list(image.shape[:3])}): its views would show the edge",
            )
    center = center_index(
        image.shape,
        mask=labels if vcfg.center == "mask" else None,
        point=vcfg.point if vcfg.center == "point" else None,
        affine=grid.affine,
    )
    if labels is None and (why := mask_requirement(cfg)):
        raise VolumeError(volume.path, f"{why} but the case has no mask")
    background = float(image.min())
    shown = (
        np.where(_inside(labels, vcfg.mask_margin_mm, grid.spacing), image, background)
        if vcfg.within_mask
        else image
    )
    views = extract_views(shown, center, vcfg.mode, vcfg.thickness, fill=background).astype(np.float32)
    if vcfg.distance:
        distance = surface_distance(shape_mask, grid.spacing)
        if vcfg.within_mask:
            distance[labels == 0] = 0
        views = np.concatenate([views, extract_views(distance, center, vcfg.mode, vcfg.thickness, fill=0)], 1)
    arrays: dict[str, np.ndarray] = {"views": views, "affine": grid.affine}
    if labels is not None:
        # Mask views keep label values: a projection of labels is their max, never their mean.
        mask_mode = {"mean": "max", "projections": "max"}.get(vcfg.mode, vcfg.mode)
        thickness = vcfg.thickness if vcfg.mode != "projections" else max(labels.shape)
        mask_views = extract_views(labels, center, mask_mode, thickness, fill=0)
        if vcfg.mode == "projections":  # match the image's (slice, mean, max) channels
            mask_views = np.concatenate(
                [extract_views(labels, center, "slice", fill=0), mask_views, mask_views], 1
            )
        arrays["mask_views"] = mask_views
    if cfg.cache_volume:
        arrays["volume"] = image.astype(np.float16)
        if labels is not None:
            arrays["mask"] = labels
    sample = raw[::2, ::2, ::2][foreground[::2, ::2, ::2]]
    stats = {
        "native_shape": list(volume.shape),
        "native_spacing": [round(float(s), 5) for s in volume.spacing],
        "axcodes": "".join(volume.axcodes),
        "oblique": bool(np.count_nonzero(np.abs(volume.affine[:3, :3]) > 1e-6) > 3),
        "spacing": [round(float(s), 5) for s in grid.spacing],
        "foreground_fraction": round(float(foreground.mean()), 5),
        "intensity_percentiles": [round(float(v), 3) for v in np.percentile(sample, [0.5, 50, 99.5])]
        if sample.size
        else None,
        "center": list(center),
    }
    return arrays, stats


def read_case(case: Case, io: IOConfig) -> tuple[Volume, Volume | None]:
    """Read a case's image and mask with the configured header checks."""
    kwargs = {"max_voxels": io.max_voxels, "allow_2d": io.allow_2d}
    image = read_volume(
        case.image, volume_index=io.volume_index, nonfinite=io.nonfinite, series_uid=case.series_uid, **kwargs
    )
    mask = read_volume(case.mask, **kwargs) if case.mask is not None else None
    return image, mask


def _work(payload: tuple[Case, Config, str, Path]) -> Row:
    """One case in a worker: read, preprocess, write the cache entry atomically."""
    case, config, params_hash, out = payload
    try:
        volume, mask = read_case(case, config.io)
        arrays, stats = preprocess_volume(volume, mask, config.preprocess)
    except VolumeError:
        raise
    except Exception as exc:  # name the file whatever failed inside
        raise VolumeError(case.image, f"{type(exc).__name__}: {exc}") from exc
    meta = {
        "case_id": case.case_id,
        "label": case.label,
        "split": case.split,
        "params_hash": params_hash,
        "stats": stats,
    }
    save_entry(out, arrays, meta)
    return Row(case.case_id, "ok", output=str(out), extra={"stats": stats})


def load_cases(config: Config) -> CaseSet:
    """The validated cases of the config's manifest or input folder, with a split for each."""
    data = config.data
    if (data.manifest is None) == (data.input is None):
        raise ValueError("give exactly one of data.manifest (--manifest) or data.input (--input)")
    if data.manifest is not None:
        case_set = read_manifest(data.manifest, data.classes, data.allow_outside_paths)
    else:
        case_set = discover_folder(data.input)  # type: ignore[arg-type]
    return assign_splits(case_set, data.val_fraction, data.test_fraction, data.seed)


def _write_cases(path: Path, case_set: CaseSet, rows: dict[str, Row], out: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, CASE_COLUMNS)
        writer.writeheader()
        for case in case_set.cases:
            row = rows.get(case.case_id)
            cache = os.path.relpath(row.output, out) if row is not None and row.output else ""
            writer.writerow(
                {
                    "case_id": case.case_id,
                    "label": "" if case.label is None else case.label,
                    "label_name": "" if case.label is None else case_set.classes[case.label],
                    "split": case.split or "",
                    "patient_id": case.patient_id or "",
                    "image": str(case.image),
                    "mask": str(case.mask) if case.mask else "",
                    "cache": cache,
                    "status": row.status if row is not None else "",
                }
            )


def run_preprocess(config: Config) -> Path:
    """Run the preprocess stage; return ``RUN/preprocess``."""
    out = config.run_dir / "preprocess"
    cache_dir = out / "cache"
    case_set = load_cases(config)  # a manifest or folder that cannot be read leaves no run folder
    with folder_lock(out):
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        params = {
            "preprocess": config.preprocess.model_dump(mode="json", exclude={"workers", "scheduler"}),
            "io": config.io.model_dump(mode="json"),
            "classes": case_set.classes,
        }
        base_hash = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
        ledger = Ledger(out / "ledger.csv")
        tasks = []
        for case in case_set.cases:
            entry = cache_dir / f"{case.case_id}.npz"
            case_hash = case_signature(base_hash, (case.image, case.mask))
            if case.problem:
                ledger.append(Row(case.case_id, "error", f"{case_set.source}: {case.problem}"))
            elif valid_entry(entry, case_hash):
                ledger.append(
                    Row(case.case_id, "skipped", "valid cache entry", output=str(entry), signature=case_hash)
                )
            else:
                tasks.append(Task(case.case_id, (case, config, case_hash, entry), case_hash))
        pcfg = config.preprocess
        done = run_cases(
            _work, tasks, ledger, workers=pcfg.workers, desc="preprocess", scheduler=pcfg.scheduler
        )
        order = [c.case_id for c in case_set.cases]
        ledger.compact(order)
        rows = ledger.rows()
        stats = {row.case_id: row.extra["stats"] for row in done if row.status == "ok"}
        for cid, row in rows.items():  # entries made by an earlier run: read their stats back
            if row.status in ("ok", "skipped") and cid not in stats:
                stats[cid] = load_meta(row.output)["stats"]
        _write_cases(out / "cases.csv", case_set, rows, out)
        write_json(out / "params.json", params)
        write_json(out / "fingerprint.json", fingerprint(case_set, rows, stats))
        save_config(config, out / "config.yaml")
        return out
