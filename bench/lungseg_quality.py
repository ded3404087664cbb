"""Benchmark: lung segmentation quality on kmader_lung2d (267 real CT slices), over several seeds.

For each seed: train ``medpipe train segment`` on the manifest's train split (early stopping on the
val split), then ``evaluate segment`` on the 40 test slices (whole pipeline: preprocessing, net,
post-processing, Dice on the original 512² grid). Prints per seed the test Dice mean ± sd, median,
worst slice, the worst three slices and the training time, and writes ``summary.json``.

Goals (issue 4): mean ≥ 0.988, median ≥ 0.991, worst slice ≥ 0.95 in every seed, ≤ 15 min training
per seed on 2 cores.

Defaults are the chosen configuration (selected on the val split only): the default 16-wide UNet at
256² with soft masks, trained and run under bfloat16 autocast (``segment.precision: auto``), 120
epochs of cosine schedule run to the end (no early stopping; the best val epoch is kept), no EMA.
80 epochs beat 40 on val (seed 0, 8-wide net: best val Dice 0.9870 vs 0.9858), and 120 beat 80
(seed 0: 0.9886 / 0.9907 mean / median against 0.9882 / 0.9906 on val's 512² grid; seeds 0-2
pooled 0.9887 / 0.9909 against stop 14's 0.9883 / 0.9904). An epoch of the 16-wide net in
bfloat16 took 7-9 s on the 2-core machine of earlier runs (80 epochs: 11-12 min), 5-6 s on a
later one (120 epochs: 9.9-12.6 min) and 6.5-7 s on a later one still (15.0-15.7 min). The 16-wide
net was the best width on val (``pipeline/models/lung_unet.py``); until bfloat16 it was too slow for
the speed goal.

``--flip-tta`` scores every slice with its left-right mirror too (``segment.flip_tta``). On val
(seeds 0-2, 120 epochs) it gave 0.9889 / 0.9913 against 0.9887 / 0.9909, but it doubles the net's
time: ``bench/lungseg_speed.py`` took 6.64 s for the 512x512x300 scan with it against 4.43 s
without, past the 6 s goal, so it is an option and not the default.

``--ensemble`` also scores the seeds' nets as one ensemble of their mean probability (what
``predict segment --model A B C`` does). For the three 120-epoch nets (``--no-flip-tta``): val
0.9892 / 0.9920 mean / median against 0.9887 / 0.9909 for one net, test 0.9882 / 0.9887 (worst
0.9688) against 0.9871-0.9879 / 0.9881-0.9883. That costs three nets' training (34 min) and three
times the net's time (``bench/lungseg_speed.py``, the 300-slice scan: 10.5 s against 6.1 s for one
net in the same hour), past both budgets, so it is an option. Even three nets leave the test median
under 0.991.

Not adopted, judged on val: nnU-Net-style intensity augmentation on top of the current chain
(Gaussian noise up to 0.05 instead of 0.02 of the window, Gaussian blur of 0.5-1 px with p 0.2, gamma
0.7-1.5 with p 0.3; Isensee et al. 2021, nnU-Net's data augmentation), seed 0: val 0.9883 / 0.9905
against 0.9886 / 0.9907, and 16.0 min of training on a slow day. Cropping to the lungs' box, and
gating the post-processed mask by HU (keep only the filled, 0-2 px dilated region below
-500...-200 HU, raw or smoothed): every variant
lowered the mean val Dice of all 3 seeds (best 0.9867 against 0.9872), though it removes the shell
of noisy soft tissue the net adds around the apical test slice ID_0175_Z_0165.

Where the remaining error is (seed 1's 8-wide net, 512² grid after post-processing): 82% of the
wrong pixels on val lie within 1 px of the reference boundary (94% within 4 px), false positives and
negatives balance (28.6k / 27.9k), and moving the score threshold off 0 lowers the mean val Dice
(0.9875 at 0; 0.9871 / 0.9873 at -0.25 / +0.25). The 256² working grid is not the limit: the
reference masks, taken to 256² and back, score 0.9995, and a finer grid did not help either (an
8-wide net at 384², which costs the 16-wide net's time at 256²: best val Dice 0.9877 against 0.9880,
seed 0, 12.6 min). Nor is it the nets' variance: with several seeds the bench prints the Dice
between the seeds' masks next to their Dice with the reference. For the three 16-wide nets on val:
0.9946 mean (median 0.9950) between seeds, 0.9883 (0.9904) against the reference; the 120-epoch
nets (seeds 0-2) gave 0.9952 (0.9956) and 0.9887 (0.9909) on val, 0.9933 (0.9947) and 0.9875
(0.9881) on test. The nets converge on one boundary, and the reference differs from it by about
twice their spread: a one-pixel disagreement along the contour that no net here has learnt to
predict, most likely in the manual masks themselves.

Two more checks point the same way. More data would not help: with 40 of the 187 train slices left
out (chosen by a hash of the id; 153 epochs, so the same number of steps), seed 0 scored 0.9889 /
0.9910 on val against 0.9886 / 0.9907 with all 187. And the masks look drawn on a grid twice as
coarse as the images: in 256 of the 267 masks 55-71% (the other 11: 48-55%; pooled 60%) of the
label changes along a row or column fall between pixels 2k-1 and 2k, where a contour independent
of the grid gives 50%; no other period shows.
So the annotators' boundary choices come in 2-px steps on the 512² grid, which is about the
disagreement left. Pulling the nets' 512² scores a quarter of the way towards their mean over the
same aligned 2x2 blocks raised the val Dice by only 0.00014 (3 nets; blocks offset by one pixel
lowered it by 0.0005), too little to ship.

Beside the test figures, each seed's net segments a real 3D CT outside kmader's kind (``WHOLE_CT``:
lung bases and upper abdomen at 3 mm, from orientation_testdata), scored against TotalSegmentator's
lobes. It shows the limit of training on 2D thoracic slices alone: the three nets score Dice
0.44 / 0.52 / 0.37, find the right base (0.51-0.70) and miss the left one. What they keep instead is
air the thoracic slices never show: bowel gas, and thin sheets of air along the skin (between the
back and the table) that the body mask encloses and that outsize a lung base. Two fixes were tried
and not adopted:
- augmentations: gas painted into the soft tissue of training slices (ellipses of -1000...-750 HU,
  label unchanged, p 0.3) gave seed 0 val 0.9886 / 0.9909 and whole-CT Dice 0.49, but seed 1 lost
  val Dice (0.9876 against 0.9884 at 256²) and scored 0 on the whole CT, keeping only air sheets at
  the skin. Adding MONAI's RandSimulateLowResolutiond (p 0.25, zoom 0.35-1, as nnU-Net does) gave
  seed 0 val 0.9884 / 0.9907 and whole-CT Dice 0.56, at 30% more time per epoch (13.2 min).
- post-processing: dropping components that never reach 25 mm inside the body would remove the air
  sheets (at most 21 mm deep, the lungs 120-130 mm), but where the field of view cuts the body
  (ID_0134_Z_0137, ID_0052_Z_0108) kmader's lungs come within 6-14 px of the body mask's edge, so
  the rule would delete real lungs.
Whole CT volumes with lung masks, which this project does not have, are what would fix it.

Usage:
    python bench/lungseg_quality.py [--seeds 0 1 2] [--epochs 120] [--size 256] [--channels 8 16 ...]
        [--flip-tta] [--evaluate-only] [--ensemble] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED / "kmader_lung2d" / "manifest.csv"
# A real 3D CT of the lung bases and upper abdomen (3 mm), with TotalSegmentator's lung lobes as
# reference (model output, not manual): outside kmader's thoracic slices, with bowel gas beside the
# lungs (see that folder's SOURCE.md)
WHOLE_CT = SHARED / "orientation_testdata" / "images" / "totalseg_example_ct_sm.nii.gz"
WHOLE_CT_LOBES = SHARED / "orientation_testdata" / "labels" / "totalseg_example_ct_sm.nii.gz"


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    """Train and evaluate one seed; return its test Dice summary and training time."""
    from pipeline.config import Config
    from pipeline.evaluate.segmentation import run_evaluate_segment
    from pipeline.train.segment import run_train_segment

    config = Config.model_validate(
        {
            "name": f"lungseg_seed{seed}",
            "run": str(args.work / f"seed{seed}"),
            "data": {"manifest": str(args.manifest)},
            "segment": {
                "seed": seed,
                "epochs": args.epochs,
                "size": args.size,
                "patience": args.patience,
                "ema_decay": args.ema_decay,
                **({"channels": args.channels} if args.channels else {}),
            },
        }
    )
    out = run_train_segment(config) if not args.evaluate_only else config.run_dir / "segment"
    run_evaluate_segment(config, args.flip_tta)
    with (out / "per_case.csv").open(newline="", encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: float(r["dice"]))
    dice = np.array([float(r["dice"]) for r in rows])
    with (out / "history.csv").open(newline="", encoding="utf-8") as fh:
        history = list(csv.DictReader(fh))
    epochs, train_s = len(history), sum(float(r["seconds"]) for r in history)
    return {
        "seed": seed,
        "train_minutes": train_s / 60,
        "epochs_run": epochs,
        "n_test": len(dice),
        "mean": float(dice.mean()),
        "sd": float(dice.std(ddof=1)),
        "median": float(np.median(dice)),
        "worst": float(dice[0]),
        "worst3": [(r["case_id"], float(r["dice"])) for r in rows[:3]],
        **({"whole_ct": whole_ct_check(out)} if WHOLE_CT.is_file() else {}),
    }


def agreement(args: argparse.Namespace, split: str, ensemble: bool = False) -> dict[str, float]:
    """Dice on ``split`` between the seeds' post-processed masks and of each seed with the
    reference; with ``ensemble``, also of the seeds' nets predicting as one ensemble.

    Val gives the figures that settings such as ``--flip-tta`` are chosen by. If the nets agree with
    each other far better than with the reference, the error left is not the nets' variance.
    """
    from itertools import combinations

    from pipeline.config import Config
    from pipeline.evaluate.segmentation import case_metrics
    from pipeline.infer.segment import load_segmenter, segment_volume
    from pipeline.io import read_volume
    from pipeline.train.segment import segment_cases

    config = Config.model_validate({"data": {"manifest": str(args.manifest)}})
    runs = [(args.work / f"seed{seed}" / "segment").resolve() for seed in args.seeds]
    nets = [load_segmenter(run, args.flip_tta) for run in runs]
    joint = load_segmenter(runs, args.flip_tta) if ensemble else None
    pairs, truth_dice, joint_dice = [], [], []
    for case in (c for c in segment_cases(config) if c.split == split):
        volume = read_volume(case.image, allow_2d=True)
        truth = read_volume(case.mask, allow_2d=True).array > 0
        masks = [segment_volume(net, volume) > 0 for net in nets]
        pairs += [case_metrics(a, b, volume.spacing)["dice"] for a, b in combinations(masks, 2)]
        truth_dice += [case_metrics(m, truth, volume.spacing)["dice"] for m in masks]
        if joint is not None:
            joint_dice.append(case_metrics(segment_volume(joint, volume) > 0, truth, volume.spacing)["dice"])
    figures: dict[str, float | str] = {"split": split}
    for name, values in (("between_seeds", pairs), ("with_reference", truth_dice), ("ensemble", joint_dice)):
        if values:
            figures.update(
                {f"{name}_mean": float(np.mean(values)), f"{name}_median": float(np.median(values))}
            )
    if joint_dice:
        figures["ensemble_worst"] = float(np.min(joint_dice))
    return figures


def whole_ct_check(run: Path) -> dict[str, float]:
    """Dice of one net's post-processed mask on ``WHOLE_CT`` against the lobes (both lungs, and each
    side: lobes 1-2 are left, 3-5 right), and the mL it labels outside them."""
    from pipeline.evaluate.segmentation import case_metrics
    from pipeline.infer.segment import load_segmenter, segment_volume
    from pipeline.io import read_volume
    from pipeline.segment.postprocess import LEFT, RIGHT

    volume = read_volume(WHOLE_CT)
    lobes = read_volume(WHOLE_CT_LOBES).array
    labels = segment_volume(load_segmenter(run.resolve(), False), volume)

    def dice(pred: np.ndarray, truth: np.ndarray) -> float:
        return case_metrics(pred, truth, volume.spacing)["dice"]

    return {
        "dice": dice(labels > 0, lobes > 0),
        "right": dice(labels == RIGHT, lobes >= 3),
        "left": dice(labels == LEFT, (lobes > 0) & (lobes <= 2)),
        "false_ml": float(((labels > 0) & (lobes == 0)).sum() * np.prod(volume.spacing) / 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_lungseg_quality"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--patience", type=int, default=None, help="early stopping (default: none)")
    parser.add_argument(
        "--ema-decay", type=float, default=None, help="validate and keep an EMA of the weights"
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--channels", type=int, nargs="+", help="UNet widths (default: the config's)")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="re-evaluate the nets already in --work (after a post-processing change); the training "
        "time is then the sum of the epoch times in history.csv",
    )
    parser.add_argument(
        "--flip-tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average each slice with its left-right mirror at inference (default: the checkpoint's)",
    )
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="also score the seeds' nets as one ensemble (predict segment --model A B C) on val and test",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from pipeline.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the medpipe executable does
    results = []
    for seed in args.seeds:
        result = run_seed(seed, args)
        results.append(result)
        worst3 = ", ".join(f"{cid} {d:.4f}" for cid, d in result["worst3"])
        print(
            f"seed {seed}: Dice {result['mean']:.4f} ± {result['sd']:.4f}, median {result['median']:.4f}, "
            f"worst {result['worst']:.4f} [{worst3}]; training {result['train_minutes']:.1f} min "
            f"({result['epochs_run']} epochs)",
            flush=True,
        )
        if "whole_ct" in result:
            ct = result["whole_ct"]
            print(
                f"  whole 3D CT (lung bases, 3 mm): Dice {ct['dice']:.3f} (right {ct['right']:.3f}, "
                f"left {ct['left']:.3f}), {ct['false_ml']:.1f} mL labelled outside the lobes"
            )
    goals = all(r["mean"] >= 0.988 and r["median"] >= 0.991 and r["worst"] >= 0.95 for r in results)
    print(f"goals (mean ≥ 0.988, median ≥ 0.991, worst ≥ 0.95 in every seed) met: {goals}")
    # val is what settings are chosen by; test is where the goals are measured
    agree = {split: agreement(args, split, ensemble=args.ensemble) for split in ("val", "test")}
    for figures in agree.values():
        between = (
            f"between seeds: mean {figures['between_seeds_mean']:.4f}, "
            f"median {figures['between_seeds_median']:.4f}; "
            if "between_seeds_mean" in figures
            else ""
        )
        print(
            f"{figures['split']} Dice {between}against the reference (every seed): mean "
            f"{figures['with_reference_mean']:.4f}, median {figures['with_reference_median']:.4f}"
        )
        if "ensemble_mean" in figures:
            print(
                f"{figures['split']} Dice of the {len(args.seeds)} seeds' nets as one ensemble: mean "
                f"{figures['ensemble_mean']:.4f}, median {figures['ensemble_median']:.4f}, "
                f"worst {figures['ensemble_worst']:.4f}"
            )
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "summary.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "seeds": results,
                "goals_met": goals,
                "agreement": agree,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
