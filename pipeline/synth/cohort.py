"""Write a synthetic cohort: images, lung masks, ``cohort.json`` and, last, ``manifest.csv``.

Layout of ``out``::

    images/phantom_0000.nii.gz   int16 HU
    masks/phantom_0000.nii.gz    uint8 lung mask (1 right, 2 left), same affine
    cohort.json                  the arguments and each case's orientation, obliquity, label, lesion
    manifest.csv                 case_id,image,mask,label,patient_id (label = normal | lesion)

Exactly ``round(n * positive_fraction)`` cases are positive, chosen by a permutation seeded with
``seed``. Case ``i`` is generated from a seed derived from ``(seed, i)``, so it does not depend on
``n``. The manifest is written last and atomically: a cohort without one is incomplete.

Example:
    >>> write_cohort("cohort", n=10, positive_fraction=0.2, seed=1)  # doctest: +SKIP
    PosixPath('cohort/manifest.csv')
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.io import atomic_path, save_nifti
from pipeline.synth.phantom import generate_case

__all__ = ["LABEL_NAMES", "MANIFEST_COLUMNS", "case_seed", "write_cohort"]

LABEL_NAMES = ("normal", "lesion")
MANIFEST_COLUMNS = ("case_id", "image", "mask", "label", "patient_id")


def case_seed(seed: int, index: int) -> int:
    """The generator seed of case ``index`` in a cohort seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _write_case(out: Path, i: int, seed: int, positive: bool, size: int | None, depth: int | None) -> tuple:
    """Generate and write case ``i``; return its manifest row and its cohort.json entry."""
    case_id = f"phantom_{i:04d}"
    case = generate_case(case_seed(seed, i), positive=positive, size=size, depth=depth)
    image, mask = f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz"
    save_nifti(out / image, case.image, case.affine)
    save_nifti(out / mask, case.mask, case.affine)
    label = LABEL_NAMES[case.label]
    meta = {"case_id": case_id, "label": label, "lesion_center_ras": case.lesion_center_ras, **case.meta}
    return (case_id, image, mask, label, case_id), meta


def write_cohort(
    out: str | Path,
    n: int,
    positive_fraction: float = 0.2,
    *,
    size: int | None = None,
    depth: int | None = None,
    seed: int = 0,
    progress: bool = False,
    workers: int = 0,
) -> Path:
    """Generate ``n`` cases into ``out`` (on ``workers`` processes if > 0); return the manifest path.

    The files do not depend on ``workers``: each case has its own seed.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    manifest.unlink(missing_ok=True)  # an old manifest must not describe a half-rewritten cohort

    positives = set(np.random.default_rng(seed).permutation(n)[: round(n * positive_fraction)].tolist())
    jobs = [(out, i, seed, i in positives, size, depth) for i in range(n)]
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=spawn) if workers > 0 else None
    try:
        done = (pool.map if pool else map)(_write_case, *zip(*jobs, strict=True))
        results = list(tqdm(done, total=n, desc="synth", unit="case", disable=not progress))
    finally:
        if pool is not None:
            pool.shutdown()
    rows, cases = (list(x) for x in zip(*results, strict=True))

    args = {"n": n, "positive_fraction": positive_fraction, "size": size, "depth": depth, "seed": seed}
    with atomic_path(out / "cohort.json") as tmp:
        tmp.write_text(json.dumps({"generator": "pipeline.synth", "args": args, "cases": cases}, indent=1))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    with atomic_path(manifest) as tmp:
        tmp.write_text(text.getvalue(), encoding="utf-8")
    return manifest
