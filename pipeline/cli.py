"""The ``medpipe`` command line: parse arguments, call one stage function, say where results went.

A CLI flag overrides the matching config key; the resolved config is saved in the run folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline import __version__
from pipeline.allocator import keep_freed_memory
from pipeline.batch import Ledger, SchedulerLost, storage_failure
from pipeline.config import Config, config_yaml, load_config
from pipeline.folder_lock import FolderInUse
from pipeline.io import VolumeError
from pipeline.manifest import ManifestError

__all__ = ["main"]

TASKS = ("classify", "segment")
BATCH_FAILED = 1  # exit code of preprocess/predict when no case succeeded; 2 is a usage/input error
# a batch stopped before its end, not by a case's fault: the output folder could not be written
# (full, over quota or read-only), or the Dask scheduler was lost; the finished cases are recorded
BATCH_STOPPED = 3


def _config(args: argparse.Namespace, **overrides: object) -> Config:
    """The config file (or defaults) with the given CLI overrides applied."""
    return load_config(getattr(args, "config", None), run=getattr(args, "run", None), **overrides)


def _run_config(
    args: argparse.Namespace, task: str, fallbacks: tuple[str, ...] = (), **overrides: object
) -> Config:
    """``--config`` if given, else the config the run folder saved: the task's, then preprocess's,
    then those of the ``fallbacks`` stages (the report reads a run that trained only a lung net)."""
    if args.config is None:
        if not args.run.is_dir():
            raise FileNotFoundError(f"{args.run}: run folder not found")
        stages = [task, "preprocess", *fallbacks]
        args.config = next((p for s in stages if (p := args.run / s / "config.yaml").is_file()), None)
        if args.config is None:
            where = ", ".join(f"{s}/" for s in stages)
            raise FileNotFoundError(f"{args.run}: no saved config in {where}; give --config")
    return _config(args, **overrides)


def _print_ledger(title: str, ledger_path: Path, max_errors: int = 20) -> int:
    """Print the ok/skipped/error totals of a ledger and the first error reasons; return the exit
    code: 1 when every case failed (``BATCH_FAILED``), else 0."""
    rows = Ledger(ledger_path).rows()
    counts = Counter(r.status for r in rows.values())
    print(f"{title}: {counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} error")
    errors = [r for r in rows.values() if r.status == "error"]
    for row in errors[:max_errors]:
        print(f"  error {row.case_id}: {row.reason}")
    if len(errors) > max_errors:
        print(f"  ... and {len(errors) - max_errors} more errors in {ledger_path}")
    return BATCH_FAILED if errors and len(errors) == len(rows) else 0


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
        workers=args.workers,
    )
    print(f"wrote {args.n} synthetic cases; manifest: {manifest}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(config_yaml(load_config(args.config)), end="")
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
    code = _print_ledger("preprocess", out / "ledger.csv")
    print(f"outputs: {out} (cache/, cases.csv, ledger.csv, fingerprint.json, params.json)")
    return code


def cmd_train(args: argparse.Namespace) -> int:
    if args.task == "classify":
        from pipeline.train.classify import run_train_classify as train
    else:
        from pipeline.train.segment import run_train_segment as train
    out = train(_run_config(args, args.task, **{f"{args.task}.epochs": args.epochs}), resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 only
        print(f"trained {args.task}: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "classify":
        from pipeline.evaluate.classification import run_evaluate_classify as evaluate
    else:
        from pipeline.evaluate.segmentation import run_evaluate_segment as evaluate
    print(f"evaluated {args.task}: {evaluate(_run_config(args, args.task))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (serial) or more processes")
    options: dict[str, bool | None] = {}  # the segment-only ones
    if args.task == "classify":
        from pipeline.infer.classify import run_predict_classify as predict

        if args.flip_tta is not None:
            raise ValueError("--flip-tta is an option of predict segment")
        if len(args.model) > 1:
            raise ValueError("several --model folders (an ensemble) are an option of predict segment")
        model = args.model[0]
    else:
        from pipeline.infer.segment import run_predict_segment as predict

        options["flip_tta"] = args.flip_tta
        model = args.model
    io = {
        k: v for k, v in (("volume_index", args.volume_index), ("nonfinite", args.nonfinite)) if v is not None
    }
    out = predict(
        model, args.input, args.out, workers=args.workers, scheduler=args.scheduler, io=io, **options
    )
    code = _print_ledger(f"predict {args.task}", args.out / "ledger.csv")
    print(f"outputs: {out}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.stage import run_report

    print(f"report: {run_report(_run_config(args, 'report', fallbacks=TASKS))}")
    return 0


def _stage_ledgers(config: Config, stage: str) -> list[tuple[str, Path]]:
    """(title, ledger path) of each per-case batch a ``medpipe run`` stage wrote (preprocess, predict)."""
    from pipeline.workflow import predict_dir

    if stage == "preprocess":
        return [("preprocess", config.run_dir / "preprocess" / "ledger.csv")]
    if stage == "predict":
        tasks = [t for t in TASKS if getattr(config.predict, t) is not None]
        return [(f"predict {t}", predict_dir(config, t) / "ledger.csv") for t in tasks]
    return []


def cmd_run(args: argparse.Namespace) -> int:
    """Each stage in turn; a preprocess or predict batch prints its ledger totals, and one where
    every case failed stops the run with ``BATCH_FAILED``, as the stage's own command would."""
    from pipeline.workflow import run_stages

    config = load_config(args.config, run=args.run)
    timings: dict[str, float] = {}
    code = 0
    for stage in config.stages:
        timings.update(run_stages(config, [stage]))
        code = max([0, *(_print_ledger(t, path) for t, path in _stage_ledgers(config, stage))])
        if code:
            print(f"stopped after {stage}: every case failed", file=sys.stderr)
            break
    print("timings: " + ", ".join(f"{stage} {sec:.1f}s" for stage, sec in timings.items()))
    print(f"outputs: {config.run_dir}")
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    start = time.perf_counter()
    timings = run_demo(args.run, quick=args.quick)
    _print_ledger("preprocess", args.run / "preprocess" / "ledger.csv")
    print("timings: " + ", ".join(f"{step} {sec:.1f}s" for step, sec in timings.items()))
    for line in _headlines(args.run):
        print(line)
    print(
        f"demo finished in {time.perf_counter() - start:.0f}s; report: {args.run / 'report' / 'index.html'}"
    )
    return 0


def _headlines(run: Path) -> list[str]:
    """One line per model with its main test metrics, from the stage metrics files."""
    lines = []
    classify = run / "classify" / "metrics.json"
    if classify.is_file():
        test = json.loads(classify.read_text())["test"]["at_val_threshold"]
        names = ("auc", "sensitivity", "specificity", "balanced_accuracy", "f1")
        lines.append("classifier (test): " + ", ".join(f"{n} {test[n]['value']:.3f}" for n in names))
    segment = run / "segment" / "metrics.json"
    if segment.is_file():
        seg = json.loads(segment.read_text())
        lines.append(
            f"lung segmentation (test): Dice {seg['dice']['mean']:.3f}, HD95 {seg['hd95_mm']['mean']:.1f} mm"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="medpipe",
        description="Preprocess CT/MR scans, train and evaluate the multi-view classifier and the lung "
        "segmenter, predict on new scans and write an HTML report.",
        epilog="Start with 'medpipe demo' (every stage on a generated phantom cohort, into runs/demo); "
        "'medpipe COMMAND --help' lists a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"medpipe {__version__}")
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
    p.add_argument("--n", type=int, default=40, help="number of cases (default: 40)")
    p.add_argument(
        "--positive-fraction", type=float, default=0.2, help="fraction with a lung lesion (default: 0.2)"
    )
    p.add_argument("--size", type=int, default=None, help="in-plane size (default: 128-192 per case)")
    p.add_argument(
        "--depth", type=int, default=None, help="number of slices (default: from the chest height)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, default=0, help="local worker processes (0 = serial)")

    p = command("preprocess", cmd_preprocess, "reorient, resample, normalise, crop and cut the three views")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--manifest", type=Path, help="manifest CSV (case_id,image[,label,mask,split,patient_id,series_uid])"
    )
    source.add_argument("--input", type=Path, help="a folder of scans (NIfTI/NRRD/MHA files, DICOM series)")
    p.add_argument("--config", type=Path, help="experiment config YAML")
    p.add_argument("--run", type=Path, help="run folder (default: runs/<name>)")
    p.add_argument("--workers", type=int, default=None, help="local worker processes (0 = serial)")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://HOST:PORT) to run the cases on")

    for name, handler, help_ in (
        ("train", cmd_train, "train the classifier or the lung segmenter on a preprocessed run"),
        ("evaluate", cmd_evaluate, "evaluate a trained model on the run's test split"),
    ):
        p = command(name, handler, help_)
        p.add_argument("task", choices=TASKS)
        p.add_argument("--run", type=Path, required=True, help="run folder")
        p.add_argument("--config", type=Path, help="config YAML (default: the one saved in the run folder)")
        if name == "train":
            p.add_argument("--epochs", type=int, help="maximum epochs (overrides the config)")
            p.add_argument("--resume", action="store_true", help="continue an interrupted training run")

    p = command("predict", cmd_predict, "run a trained model on new scans (resumable; one row per input)")
    p.add_argument("task", choices=TASKS)
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="the trained model folder, e.g. RUN/segment; segment: several folders (--model A B or "
        "--model A --model B) predict as one ensemble (their nets' mean probability; the sum of their "
        "times)",
    )
    p.add_argument("--input", type=Path, required=True, help="a scan, a folder of scans or a manifest CSV")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--workers", type=int, default=0, help="local worker processes (0 = serial)")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://HOST:PORT) to run the cases on")
    p.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="segment: average each slice's scores with its left-right mirror's (twice the net's time; "
        "default: the checkpoint's segment.flip_tta)",
    )
    p.add_argument(
        "--volume-index",
        type=int,
        help="4D scans: the volume to read, from 0 (default: the checkpoint's io.volume_index)",
    )
    p.add_argument(
        "--nonfinite",
        choices=["error", "zero"],
        help="NaN/Inf voxels: refuse the scan, or read them as 0 (default: the checkpoint's io.nonfinite)",
    )

    p = command("report", cmd_report, "write RUN/report/index.html from whatever stages the run holds")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--config", type=Path, help="config YAML (default: the one saved in the run folder)")

    p = command(
        "run",
        cmd_run,
        "run every stage a config names, in order (its 'stages' list: preprocess, classify and segment "
        "(each train, then evaluate), predict (on the inputs predict.classify and predict.segment name), "
        "report)",
    )
    p.add_argument("config", type=Path, help="experiment config YAML")
    p.add_argument("--run", type=Path, help="run folder (default: runs/<name>)")

    p = command(
        "config",
        cmd_config,
        "check a config YAML and print it resolved: every key, with the defaults of those it leaves out",
    )
    p.add_argument(
        "config", type=Path, nargs="?", help="experiment config YAML (default: none, the defaults)"
    )

    p = command("demo", cmd_demo, "run every stage on a generated synthetic chest CT cohort")
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small, fast cohort (what the tests use)")
    return parser


def entry() -> int:
    """The ``medpipe`` executable and ``python -m pipeline``: the process-wide allocator setting
    (``pipeline.allocator``), then ``main``."""
    keep_freed_memory()
    return main()


def _check_output_folders(args: argparse.Namespace) -> None:
    """Refuse a ``--run`` or ``--out`` that names a file, before a stage writes anything below it."""
    for flag in ("run", "out"):
        value = getattr(args, flag, None)
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise NotADirectoryError(f"{value}: --{flag} names a file, not a folder")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line on ``argv`` (default: ``sys.argv``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        _check_output_folders(args)
        return args.handler(args)
    except (
        FolderInUse,
        ManifestError,
        VolumeError,
        ValidationError,
        ValueError,
        FileNotFoundError,
        FileExistsError,  # --out or --run naming a file
        NotADirectoryError,
        PermissionError,
    ) as exc:
        print(f"medpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SchedulerLost as exc:
        print(f"medpipe {args.command}: error: {exc}", file=sys.stderr)
        return BATCH_STOPPED
    except OSError as exc:
        if not storage_failure(exc):
            raise
        print(
            f"medpipe {args.command}: error: {exc}; any case that finished is recorded: free space (or "
            "make the folder writable) and rerun the same command to go on",
            file=sys.stderr,
        )
        return BATCH_STOPPED
    except KeyboardInterrupt:
        again = (
            "rerun with --resume to continue"
            if args.command == "train"
            else "rerun the same command to resume"
        )
        print(f"medpipe {args.command}: interrupted; {again}", file=sys.stderr)
        return 130
