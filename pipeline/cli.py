"""The ``medpipe`` command line: parse arguments, call one stage function, say where results went.

A CLI flag overrides the matching config key; the resolved config is saved in the run folder.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline.batch import Ledger
from pipeline.config import Config, load_config
from pipeline.io import VolumeError
from pipeline.manifest import ManifestError

__all__ = ["main"]


def _config(args: argparse.Namespace, **overrides: object) -> Config:
    """The config file (or defaults) with the given CLI overrides applied."""
    return load_config(getattr(args, "config", None), run=getattr(args, "run", None), **overrides)


def _print_ledger(title: str, ledger_path: Path, max_errors: int = 20) -> None:
    """Print the ok/skipped/error totals of a ledger and the first error reasons."""
    rows = Ledger(ledger_path).rows()
    counts = Counter(r.status for r in rows.values())
    print(f"{title}: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} error")
    errors = [r for r in rows.values() if r.status == "error"]
    for row in errors[:max_errors]:
        print(f"  error {row.case_id}: {row.reason}")
    if len(errors) > max_errors:
        print(f"  ... and {len(errors) - max_errors} more errors in {ledger_path}")


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import write_cohort

    manifest = write_cohort(
        args.out,
        args.n,
        args.positive_fraction,
        size=args.size,
        depth=args.depth,
        seed=args.seed,
        progress=True,
    )
    print(f"wrote {args.n} synthetic cases; manifest: {manifest}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.preprocess.stage import run_preprocess

    overrides = {
        "data.manifest": args.manifest,
        "data.input": args.input,
        "preprocess.workers": args.workers,
        "preprocess.scheduler": args.scheduler,
    }
    config = _config(args, **overrides)
    out = run_preprocess(config)
    _print_ledger("preprocess", out / "ledger.csv")
    print(f"outputs: {out} (cache/, cases.csv, ledger.csv, fingerprint.json, params.json)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    timings = run_demo(args.run, quick=args.quick)
    _print_ledger("preprocess", args.run / "preprocess" / "ledger.csv")
    print("timings: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in timings.items()))
    print(f"outputs: {args.run}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(prog="medpipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = command(
        "synth", cmd_synth, "write a synthetic chest CT phantom cohort with lung masks and a manifest"
    )
    p.add_argument("--n", type=int, default=40, help="number of cases")
    p.add_argument("--positive-fraction", type=float, default=0.2, help="fraction with a lung lesion")
    p.add_argument("--size", type=int, default=None, help="in-plane size (default: 128-192 per case)")
    p.add_argument(
        "--depth", type=int, default=None, help="number of slices (default: from the chest height)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output folder")

    p = command("preprocess", cmd_preprocess, "reorient, resample, normalise, crop and cut the three views")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", type=Path, help="manifest CSV (case_id,image[,label,mask,split,patient_id])"
    )
    source.add_argument("--input", type=Path, help="a folder of scans (NIfTI/NRRD/MHA files, DICOM series)")
    p.add_argument("--config", type=Path, help="experiment config YAML")
    p.add_argument("--run", type=Path, help="run folder (default: runs/<name>)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (0 = serial)")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://HOST:PORT) to run the cases on")

    p = command("demo", cmd_demo, "run every stage on a generated synthetic chest CT cohort")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small, fast cohort (what the tests use)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``medpipe`` and ``python -m pipeline``."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ManifestError, VolumeError, ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"medpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medpipe {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
