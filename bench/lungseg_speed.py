"""Benchmark: the whole ``predict segment`` on a 512×512×300 synthetic chest CT, stage by stage.

Generates the scan with ``pipeline.synth`` (size 512, depth 300; cached in ``--work``), then times,
in a fresh process so that the peak RSS is the prediction's own and with the allocator setting of
the ``medpipe`` executable (``pipeline.allocator``): read, slice preparation, the net,
mapping back to the scan grid, post-processing, the NIfTI write (gzip level 1) and the volumes.
Prints the per-stage breakdown, slices/s and peak RSS next to lungmask's 0.86 s/slice measured on
this machine (a quoted figure, Hofmanninger et al. 2020; lungmask is not installed).

Usage:
    python bench/lungseg_speed.py --model runs/lung/segment [RUN2/segment ...] [--threads 2] [--repeats 3]
        [--precision float32|bfloat16] [--flip-tta|--no-flip-tta]   # default: the checkpoint's

Without ``--model`` a randomly initialised net of the default architecture is timed (the network
cost does not depend on the weights, but its masks are noise, so post-processing is not typical).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LUNGMASK_S_PER_SLICE = 0.86
STAGES = ("read", "prepare", "net", "restore", "postprocess", "write", "volumes")


def make_scan(work: Path) -> Path:
    """The 512×512×300 phantom scan (written once, then reused)."""
    from pipeline.synth import write_cohort

    manifest = work / "cohort" / "manifest.csv"
    if not manifest.is_file():
        write_cohort(work / "cohort", n=1, positive_fraction=0.0, size=512, depth=300, seed=0)
    return sorted((work / "cohort" / "images").glob("*.nii*"))[0]


def random_model(work: Path) -> Path:
    """A checkpoint of an untrained default net, for timing without a trained model."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config, SegmentConfig
    from pipeline.models.lung_unet import build_lung_unet
    from pipeline.train.segment import slice_params

    cfg = SegmentConfig()
    out = work / "random_model"
    meta = {
        "task": "segment",
        "config": Config().model_dump(mode="json"),
        "slice_params": slice_params(cfg).to_dict(),
        "model": {"channels": list(cfg.channels), "num_res_units": cfg.num_res_units, "dropout": cfg.dropout},
    }
    save_checkpoint(out / "checkpoint.pt", build_lung_unet(cfg.channels, cfg.num_res_units), meta)
    return out


def measure(
    scan: Path, model: list[Path], out: Path, threads: int, precision: str | None, flip_tta: bool | None
) -> dict:
    """Time one prediction in this process; return seconds per stage and the peak RSS."""
    import torch

    torch.set_num_threads(threads)
    from pipeline.allocator import keep_freed_memory
    from pipeline.infer.segment import load_segmenter, segment_volume
    from pipeline.io import read_volume, write_like
    from pipeline.segment.postprocess import lung_volumes

    keep_freed_memory()  # as the medpipe executable does
    segmenter = load_segmenter(model, flip_tta)
    if precision is not None:
        settings = segmenter.settings.model_copy(update={"precision": precision})
        segmenter = dataclasses.replace(segmenter, settings=settings)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    volume = read_volume(scan, allow_2d=True)
    timings["read"] = time.perf_counter() - start
    labels = segment_volume(segmenter, volume, timings)
    t = time.perf_counter()
    write_like(labels, volume, out / "mask.nii.gz")
    timings["write"] = time.perf_counter() - t
    t = time.perf_counter()
    volumes = lung_volumes(labels, volume.affine)
    timings["volumes"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    return {
        "slices": int(volume.shape[2]),
        "timings": timings,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "volumes_ml": volumes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, nargs="+", help="RUN/segment folder of a trained net (several: their ensemble)"
    )
    parser.add_argument("--scan", type=Path, help="time this scan instead of the 512×512×300 phantom")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_lungseg_speed"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], help="override the checkpoint's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--flip-tta", action=argparse.BooleanOptionalAction, default=None, help="override the checkpoint's"
    )
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # the child process: one timed prediction, JSON on stdout
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(args.scan, args.model, Path(tmp), args.threads, args.precision, args.flip_tta)
            print(json.dumps(result))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    scan = args.scan or make_scan(args.work)
    model = args.model or [random_model(args.work)]
    if args.model is None:
        print("no --model: timing an untrained net (post-processing on a noise mask is not typical)")
    command = [
        sys.executable,
        __file__,
        "--measure",
        "--scan",
        str(scan),
        "--model",
        *map(str, model),
        "--threads",
        str(args.threads),
        *(["--precision", args.precision] if args.precision else []),
        *([] if args.flip_tta is None else ["--flip-tta" if args.flip_tta else "--no-flip-tta"]),
    ]
    runs = [
        json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        for _ in range(args.repeats)
    ]
    best = min(runs, key=lambda r: r["timings"]["total"])
    slices = best["slices"]
    precision = args.precision or "the checkpoint's"
    tta = "the checkpoint's" if args.flip_tta is None else ("on" if args.flip_tta else "off")
    print(
        f"scan {scan} ({slices} slices), model {' + '.join(map(str, model))}, torch threads {args.threads}, "
        f"precision {precision}, flip TTA {tta}, {args.repeats} runs"
    )
    print(f"{'stage':<12}{'best run s':>12}{'median s':>12}")
    for stage in (*STAGES, "total"):
        values = sorted(r["timings"].get(stage, 0.0) for r in runs)
        print(f"{stage:<12}{best['timings'].get(stage, 0.0):>12.3f}{values[len(values) // 2]:>12.3f}")
    total = best["timings"]["total"]
    print(
        f"slices/s: {slices / total:.1f}   s/slice: {total / slices:.4f}   peak RSS: "
        f"{max(r['peak_rss_gb'] for r in runs):.2f} GB"
    )
    print(
        f"lungmask (quoted, this machine): {LUNGMASK_S_PER_SLICE} s/slice -> "
        f"{LUNGMASK_S_PER_SLICE * slices:.0f} s; speed-up {LUNGMASK_S_PER_SLICE * slices / total:.0f}x"
    )
    print("volumes (mL):", {k: round(v, 1) for k, v in best["volumes_ml"].items()})


if __name__ == "__main__":
    main()
