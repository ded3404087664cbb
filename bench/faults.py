"""Fault survival: SIGKILL mid-run, then rerun or resume, for preprocess, predict segment and training.

On a synthetic cohort (default 200 cases, in-plane size 96, depth from the phantom's chest height):

1. ``medpipe preprocess --workers 2`` (default preprocessing) runs in its own process group; the
   whole group gets SIGKILL once half the cases have a ledger row; the same command is rerun.
2. The same kill-and-rerun for ``medpipe predict segment --workers 2``, with a tiny segmenter
   trained first (1 epoch on 24 cases at 64^2: a fault test, not a quality test).
3. ``medpipe train classify`` gets SIGKILL half-way through its second epoch (after the first
   epoch's ``last_state.pt`` exists) and is resumed with ``--resume``; an uninterrupted run with the
   same config, seed and epochs is the reference.

For each batch stage it prints the cases lost (no ok/skipped row or no output), cases duplicated
(more than one ledger row, or an output file that belongs to no case), finished cases redone (an
output of a case whose ``ok`` row was on disk before the kill rewritten by the rerun: its mtime or
inode changed) and partial or corrupt files left behind (``.*.tmp*`` files, and outputs that do not
load). All four must be 0. For training it prints the final validation metrics of both runs.

Usage: python bench/faults.py [--n 200] [--size 96] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import torch
import yaml

from pipeline.batch import Ledger
from pipeline.checkpoint import load_state
from pipeline.preprocess.cache import load_entry
from pipeline.synth import write_cohort

CLASSIFY = {
    "epochs": 3,
    "batch_size": 16,
    "features": 4,
    "depth": 2,
    "hidden": 8,
    "seed": 0,
}
SEGMENT = {
    "epochs": 1,
    "batch_size": 8,
    "size": 64,
    "channels": [4, 8, 16],
    "num_res_units": 0,
    "slices_per_volume": 4,
    "augment": False,
}


def medpipe(*args: object) -> list[str]:
    """The command line of ``python -m pipeline ARGS``."""
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def run(cmd: list[str]) -> None:
    """Run ``cmd`` to the end, quietly; a failure raises."""
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 1800) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``ready()``."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        raise RuntimeError(f"{' '.join(cmd)} ended (code {proc.returncode}) before it could be killed")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rows_at_least(ledger: Path, count: int) -> Callable[[], bool]:
    """A readiness check: the ledger has rows for at least ``count`` cases."""
    return lambda: len(Ledger(ledger).rows()) >= count


def stamp(path: Path) -> tuple[int, int]:
    """What a rewrite changes: (mtime_ns, inode)."""
    info = path.stat()
    return info.st_mtime_ns, info.st_ino


def loads(path: Path) -> bool:
    """Whether an output file reads completely."""
    try:
        if path.name.endswith(".npz"):
            load_entry(path)
        else:
            nib.load(path).get_fdata()
    except Exception:  # any failure to read counts as corrupt
        return False
    return True


def kill_and_rerun(
    cmd: list[str], ledger: Path, outputs: dict[str, Path], out_root: Path
) -> dict[str, int | str]:
    """Kill ``cmd`` at about half the cases, rerun it, and audit the ledger and output files."""
    n = len(outputs)
    kill_when(cmd, rows_at_least(ledger, n // 2))
    at_kill = Ledger(ledger).rows()
    finished = {cid: stamp(outputs[cid]) for cid, row in at_kill.items() if row.status == "ok"}
    temps_at_kill = len(list(out_root.rglob(".*.tmp*")))
    run(cmd)

    with ledger.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    final = {r["case_id"]: r["status"] for r in rows}
    folder = next(iter(outputs.values())).parent
    suffix = ".npz" if folder.name == "cache" else ".nii.gz"
    expected = set(outputs.values())
    strays = [p for p in folder.glob(f"*{suffix}") if p not in expected]
    return {
        "killed at": f"{len(at_kill)}/{n}",
        "tmp at kill": temps_at_kill,
        "lost": sum(final.get(c) not in ("ok", "skipped") or not p.is_file() for c, p in outputs.items()),
        "duplicated": sum(k - 1 for k in Counter(r["case_id"] for r in rows).values()) + len(strays),
        "redone": sum(stamp(outputs[cid]) != before for cid, before in finished.items()),
        "partial/corrupt": len(list(out_root.rglob(".*.tmp*")))
        + sum(not loads(p) for p in outputs.values() if p.is_file()),
    }


def case_ids(manifest: Path) -> list[str]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        return [r["case_id"] for r in csv.DictReader(fh)]


def subset_manifest(manifest: Path, count: int) -> Path:
    """The first ``count`` rows of a manifest, beside it (paths stay relative to its folder)."""
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    path = manifest.with_name(f"first_{count}.csv")
    path.write_text("".join(lines[: count + 1]), encoding="utf-8")
    return path


def history(run: Path) -> list[dict[str, float]]:
    """The rows of ``RUN/classify/history.csv``."""
    with (run / "classify" / "history.csv").open(newline="", encoding="utf-8") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def train_kill_resume(prep: Path, root: Path) -> None:
    """Kill ``train classify`` mid-epoch 2, resume it, and compare with an uninterrupted run."""
    config = root / "classify.yaml"
    config.write_text(yaml.safe_dump({"classify": CLASSIFY}), encoding="utf-8")
    runs = {name: root / name for name in ("uninterrupted", "resumed")}
    for folder in runs.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "preprocess").symlink_to(prep.resolve())
    train = {name: medpipe("train", "classify", "--run", r, "--config", config) for name, r in runs.items()}
    run(train["uninterrupted"])

    last = runs["resumed"] / "classify" / "last_state.pt"
    first_epoch = history(runs["uninterrupted"])[0]["seconds"]

    def mid_second_epoch() -> bool:
        if not last.is_file():
            return False
        time.sleep(first_epoch / 2)
        return True

    kill_when(train["resumed"], mid_second_epoch)
    done = int(load_state(last)["epoch"]) + 1
    run([*train["resumed"], "--resume"])
    weights = [load_state(folder / "classify" / "checkpoint.pt") for folder in runs.values()]
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    print(
        f"\ntrain classify ({CLASSIFY['epochs']} epochs, seed {CLASSIFY['seed']}): SIGKILL about half-way "
        f"through epoch {done + 1} (last_state.pt held {done} finished epoch(s)), then --resume"
    )
    resumed, reference = history(runs["resumed"])[-1], history(runs["uninterrupted"])[-1]
    for key in (k for k in reference if k.startswith("val_")):
        a, b = resumed[key], reference[key]
        print(f"  final {key:<22} resumed {a:.6f}  uninterrupted {b:.6f}  diff {a - b:+.2e}")
    print(f"  best checkpoint weights identical: {'yes' if same else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=96, help="in-plane size of the phantoms")
    parser.add_argument("--keep", type=Path, help="folder for the cohort and runs (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        manifest = root / "cohort" / "manifest.csv"
        if not manifest.is_file():
            write_cohort(root / "cohort", args.n, 0.2, size=args.size, seed=7, progress=True)
        ids = case_ids(manifest)
        results = {}

        prep = root / "run" / "preprocess"
        cmd = medpipe("preprocess", "--manifest", manifest, "--run", root / "run", "--workers", 2)
        outputs = {cid: prep / "cache" / f"{cid}.npz" for cid in ids}
        results["preprocess"] = kill_and_rerun(cmd, prep / "ledger.csv", outputs, prep)

        seg_config = root / "segment.yaml"
        seg_config.write_text(
            yaml.safe_dump({"data": {"manifest": str(subset_manifest(manifest, 24))}, "segment": SEGMENT}),
            encoding="utf-8",
        )
        run(medpipe("train", "segment", "--run", root / "seg", "--config", seg_config))
        pred = root / "predict"
        cmd = medpipe("predict", "segment", "--model", root / "seg" / "segment", "--input", manifest)
        cmd += ["--out", str(pred), "--workers", "2"]
        outputs = {cid: pred / "masks" / f"{cid}.nii.gz" for cid in ids}
        results["predict segment"] = kill_and_rerun(cmd, pred / "ledger.csv", outputs, pred)

        print(
            f"\n{args.n} synthetic cases (in-plane {args.size}); SIGKILL of the process group, then a rerun"
        )
        columns = list(next(iter(results.values())))
        print(f"{'stage':<17}" + "".join(f"{c:>17}" for c in columns))
        for stage, audit in results.items():
            print(f"{stage:<17}" + "".join(f"{audit[c]!s:>17}" for c in columns))
        print("(tmp at kill: half-written files the kill left; the rest are counted after the rerun)")
        train_kill_resume(prep, root)


if __name__ == "__main__":
    main()
