"""Preprocessing throughput: serial vs 2 local worker processes vs a 2-worker Dask LocalCluster.

All three preprocess the same synthetic cohort (default 200 cases) into fresh run folders, with
the default preprocessing config (128^3 cube at 1.5 mm, cached volume). Prints cases/s, the
speed-up over serial, and the Dask overhead relative to local processes.

Goals (issue 6): >= 1.7x at 2 workers over serial; Dask overhead <= 15% vs local processes.

Usage: python bench/batch_throughput.py [--n 200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from distributed import LocalCluster

from pipeline.batch import Ledger
from pipeline.config import load_config
from pipeline.preprocess.stage import run_preprocess
from pipeline.synth import write_cohort


def timed_run(manifest: Path, run: Path, **overrides: object) -> float:
    """Preprocess the cohort into an empty run folder; return the wall time, checking all cases ok."""
    shutil.rmtree(run, ignore_errors=True)
    config = load_config(None, run=run, **{"data.manifest": str(manifest), **overrides})
    start = time.perf_counter()
    run_preprocess(config)
    seconds = time.perf_counter() - start
    statuses = {r.status for r in Ledger(run / "preprocess" / "ledger.csv").rows().values()}
    assert statuses == {"ok"}, statuses
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="folder for the cohort and runs (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        manifest = root / "cohort" / "manifest.csv"
        if not manifest.is_file():
            write_cohort(root / "cohort", args.n, 0.2, seed=11, progress=True)
        times = {
            "serial": timed_run(manifest, root / "serial"),
            "2 processes": timed_run(manifest, root / "local2", **{"preprocess.workers": 2}),
        }
        cluster_args = {"n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
        with LocalCluster(**cluster_args) as cluster:
            times["dask 2 workers"] = timed_run(
                manifest, root / "dask2", **{"preprocess.scheduler": cluster.scheduler_address}
            )
    print(f"\n{args.n} cases, default preprocessing (128^3 at 1.5 mm)")
    print(f"{'mode':<16}{'seconds':>9}{'cases/s':>9}{'speed-up':>10}")
    for mode, seconds in times.items():
        print(f"{mode:<16}{seconds:>9.1f}{args.n / seconds:>9.2f}{times['serial'] / seconds:>9.2f}x")
    overhead = times["dask 2 workers"] / times["2 processes"] - 1
    print(f"\nspeed-up at 2 workers: {times['serial'] / times['2 processes']:.2f}x (goal >= 1.7x)")
    print(f"Dask overhead vs local processes: {overhead:+.1%} (goal <= 15%)")


if __name__ == "__main__":
    main()
