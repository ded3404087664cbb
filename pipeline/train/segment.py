"""The segment training stage: a manifest with image + mask columns → ``RUN/segment``.

``run_train_segment`` reads ``config.data.manifest`` (cases without a split get the deterministic,
patient-grouped split of ``pipeline.manifest.assign_splits``), takes the axial slices of every train
and val case (a 2D image is one slice; a 3D volume gives all its slices, or ``slices_per_volume`` of
them evenly spaced), prepares them once with ``pipeline.segment.slices`` and keeps them in memory,
with soft masks (each working-grid pixel's lung fraction; lung outside the body mask dropped).
Training uses MONAI ``DiceCELoss`` on (background, lung) probabilities and Rand* augmentation
(affine, left-right flip, intensity scale and shift, Gaussian noise), through the shared loop
(``pipeline.train.loop.fit``), optionally with an EMA of the weights, early-stopping on the
validation Dice at the working resolution. ``segment.precision`` sets the net's forward pass in
training, validation and inference alike (``auto``: bfloat16 autocast where the CPU supports it).
Writes ``RUN/segment/{checkpoint.pt, checkpoint.json, last_state.pt, history.csv, config.yaml,
splits.csv, tb/}``.

Example:
    >>> out = run_train_segment(load_config("cfg.yaml"))      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline.config import Config, Precision, SegmentConfig, save_config
from pipeline.folder_lock import folder_lock
from pipeline.io import atomic_path, read_volume
from pipeline.manifest import Case
from pipeline.models.lung_unet import build_lung_unet
from pipeline.preprocess.stage import load_cases
from pipeline.segment.slices import (
    SliceParams,
    canonical_spacing,
    crop_resize,
    prepare_slices,
    to_canonical,
)
from pipeline.train import distributed
from pipeline.train.loop import LoopSettings, fit, seed_everything
from pipeline.train.precision import autocast
from pipeline.train.resume import check_resume

__all__ = [
    "SliceSet",
    "augmentation",
    "axial_stack",
    "load_slices",
    "predict_slices",
    "run_train_segment",
    "segment_cases",
    "slice_dice",
    "slice_params",
]
TRAINING_SECTIONS = ("segment", "data")  # the config sections that say what a run trains (train.resume)


@dataclass
class SliceSet:
    """Prepared slices in memory: images and masks (N, 1, n, n) float32, and ids.

    A mask holds the lung fraction of each working-grid pixel (the 0/1 source mask resized with
    antialiasing), so the net learns the sub-pixel boundary instead of a nearest-neighbour staircase.
    """

    images: torch.Tensor
    masks: torch.Tensor
    ids: list[str]


def slice_params(cfg: SegmentConfig) -> SliceParams:
    """The slice preprocessing parameters of a segment config."""
    return SliceParams(size=cfg.size, window=tuple(cfg.window), body_threshold=cfg.body_threshold)


def axial_stack(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The (S, H, W) axial slices of an (i, j, k) array in canonical (L, P, S) orientation (a view)."""
    return to_canonical(array, affine).transpose(2, 0, 1)


def segment_cases(config: Config) -> list[Case]:
    """The usable cases of ``config.data.manifest`` that have a mask, each with the split that
    ``preprocess`` gives it too (``load_cases``), so both stages test on the same cases."""
    if config.data.manifest is None:
        raise ValueError("segment training needs data.manifest (a CSV with image and mask columns)")
    cases = load_cases(config)
    usable = [c for c in cases.cases if c.problem is None and c.mask is not None]
    if not usable:
        raise ValueError(f"{config.data.manifest}: no usable case with a mask ({cases.problems[:3]})")
    return usable


def load_slices(cases: list[Case], params: SliceParams, slices_per_volume: int | None = None) -> SliceSet:
    """Read every case's image and mask and prepare its axial slices (all lung labels become 1).

    The masks are soft: each pixel's lung fraction after resizing to the working grid.
    """
    images, masks, ids = [], [], []
    for case in cases:
        image = read_volume(case.image, allow_2d=True)
        mask = read_volume(case.mask, allow_2d=True)
        if mask.shape != image.shape:
            raise ValueError(f"{case.case_id}: mask grid {mask.shape} differs from image grid {image.shape}")
        stack = axial_stack(image.array, image.affine)
        picked = np.arange(len(stack))
        if slices_per_volume is not None and len(stack) > slices_per_volume:
            picked = np.linspace(0, len(stack) - 1, slices_per_volume).round().astype(int)
        pixel_mm = canonical_spacing(image.affine)[:2]
        prepared = prepare_slices(np.ascontiguousarray(stack[picked]), params, pixel_mm)
        # labels outside the body (air mislabelled as lung in a few source masks) are dropped: the
        # net's input is air there and post-processing removes anything outside the body anyway
        truth = np.ascontiguousarray(axial_stack(mask.array, mask.affine)[picked] > 0) & prepared.body
        masks.append(crop_resize(truth, prepared.boxes, params.size, 0))
        images.append(prepared.images)
        ids += [case.case_id if len(stack) == 1 else f"{case.case_id}:{z}" for z in picked]
    return SliceSet(torch.cat(images), torch.cat(masks), ids)


def augmentation(cfg: SegmentConfig) -> Compose:
    """MONAI Rand* chain for an {"image", "label"} pair of (1, H, W) slices in (L, P) orientation.

    The soft label is resampled bilinearly, like the image. Left-right flips (axis 0) only: a
    mirrored chest is plausible anatomy, an upside-down one is not.
    """
    keys = ("image", "label")
    return Compose(
        [
            RandAffined(
                keys,
                prob=0.7,
                rotate_range=0.26,
                scale_range=0.15,
                translate_range=0.06 * cfg.size,
                shear_range=0.05,
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.05, prob=0.5),
            RandGaussianNoised("image", prob=0.3, std=0.02),
        ]
    )


class _PairDataset(Dataset):
    """{"image", "label"} items; the transform is re-seeded per item from the torch RNG (resumable)."""

    def __init__(self, data: SliceSet, transform: Compose | None) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": self.data.images[index], "label": self.data.masks[index]}
        if self.transform is not None:
            self.transform.set_random_state(int(torch.randint(0, 2**31 - 1, ()).item()))
            item = self.transform(item)
        image, lung = (
            convert_to_tensor(item[k], track_meta=False, dtype=torch.float32) for k in ("image", "label")
        )
        return {"image": image, "label": torch.cat([1 - lung, lung])}  # (background, lung) probabilities


@torch.no_grad()
def predict_slices(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    precision: Precision = "float32",
    flip: bool = False,
) -> torch.Tensor:
    """Foreground scores (logit difference lung − background), (N, 1, n, n) float32; > 0 means lung.

    With ``flip`` the score is the mean over each slice and its left-right mirror (the flip the
    training augmentation draws: the L axis, dim -2), mirrored back: test-time augmentation at
    twice the net's time.
    """
    model.eval()

    def score(batch: torch.Tensor) -> torch.Tensor:
        with autocast(precision):
            logits = model(batch).float()
        return logits[:, 1:2] - logits[:, 0:1]

    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        scores = score(batch)
        if flip:
            scores = (scores + score(batch.flip(-2)).flip(-2)) / 2
        out.append(scores)
    return torch.cat(out)


def slice_dice(scores: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per-slice Dice of scores > 0 against soft masks > 0.5, both (N, 1, H, W); two empties give 1."""
    pred, truth = (scores > 0).float(), (masks > 0.5).float()
    dice = compute_dice(pred, truth, include_background=True, ignore_empty=False)
    return dice[:, 0].numpy()


def _validator(
    data: SliceSet, batch_size: int, precision: Precision
) -> Callable[[nn.Module], dict[str, float]]:
    def validate(model: nn.Module) -> dict[str, float]:
        dice = slice_dice(predict_slices(model, data.images, batch_size, precision), data.masks)
        return {"dice": float(dice.mean()), "dice_min": float(dice.min())}

    return validate


@distributed.process_group()
def run_train_segment(config: Config, resume: bool = False) -> Path:
    """Train the lung U-Net on the manifest's train split; return ``RUN/segment``.

    Under ``torchrun`` it trains with DDP: ``batch_size`` is per process, each rank shuffles its
    share of the slices (``pipeline.train.distributed``).
    """
    cfg = config.segment
    out = config.run_dir / "segment"
    params = slice_params(cfg)
    cases = segment_cases(config)
    train_cases, val_cases = ([c for c in cases if c.split == split] for split in ("train", "val"))
    for split, chosen in (("train", train_cases), ("val", val_cases)):
        if not chosen:
            raise ValueError(
                f"{config.data.manifest}: segment training needs {split} cases; the split gives none"
            )
    with contextlib.ExitStack() as locks:
        if distributed.is_main():  # the other ranks of a torchrun train under rank 0's lock
            locks.enter_context(folder_lock(out))
        out.mkdir(parents=True, exist_ok=True)
        from pipeline.evaluate.segmentation import OUTPUTS as EVALUATION  # evaluate imports this module

        resume = resume and check_resume(out, config, TRAINING_SECTIONS, {})
        if distributed.is_main():
            save_config(config, out / "config.yaml")
            with atomic_path(out / "splits.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows([("case_id", "split"), *((c.case_id, c.split) for c in cases)])
        train = load_slices(train_cases, params, cfg.slices_per_volume)
        val = load_slices(val_cases, params, cfg.slices_per_volume)
        dataset = _PairDataset(train, augmentation(cfg) if cfg.augment else None)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=distributed.shard(RandomSampler(dataset), dataset, cfg.seed),
            drop_last=len(train.ids) > cfg.batch_size * distributed.world_size(),
        )
        seed_everything(cfg.seed)
        model = build_lung_unet(cfg.channels, cfg.num_res_units, cfg.dropout)
        settings = LoopSettings(
            epochs=cfg.epochs,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scheduler="cosine",
            patience=cfg.patience,
            monitor="dice",
            ema_decay=cfg.ema_decay,
            seed=cfg.seed,
            precision=cfg.precision,
        )
        meta = {
            "task": "segment",
            "config": config.model_dump(mode="json"),
            "slice_params": params.to_dict(),
            "model": {
                "channels": list(cfg.channels),
                "num_res_units": cfg.num_res_units,
                "dropout": cfg.dropout,
            },
            "train_slices": len(train.ids),
            "val_slices": len(val.ids),
        }
        fit(
            model,
            loader,
            DiceCELoss(softmax=True),
            _validator(val, cfg.infer_batch * 4, cfg.precision),
            out,
            settings,
            meta=meta,
            resume=resume,
            invalidates=[out / name for name in EVALUATION],
        )
        return out
