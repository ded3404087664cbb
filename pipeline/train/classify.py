"""The classify training stage: ``RUN/preprocess`` cache → ``RUN/classify`` (best checkpoint and logs).

``run_train_classify`` reads ``cases.csv`` and ``params.json``, loads the cache arrays the model
needs (views or volume) into memory, balances the training split (``pipeline.balance``), augments
it (``pipeline.augment``), and trains with the shared loop, early-stopping on the validation metric
``classify.monitor``. It writes ``RUN/classify/{checkpoint.pt, checkpoint.json, last_state.pt,
history.csv, balance.json, config.yaml, tb/}``. Under ``torchrun`` it trains with DDP
(``pipeline.train.distributed``): ``batch_size`` is per process, each rank draws its share of the
balanced sampler (``weighted_sampler``: MONAI's ``DistributedWeightedRandomSampler``) and rank 0
writes the files.

Example:
    >>> out = run_train_classify(load_config("cfg.yaml"))      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import view_augmentation, volume_augmentation
from pipeline.balance import balance
from pipeline.config import ClassifyConfig, Config, save_config
from pipeline.io import atomic_path
from pipeline.models import build_model, model_spec
from pipeline.preprocess.cache import load_entry
from pipeline.train import distributed
from pipeline.train.loop import LoopSettings, fit, seed_everything

__all__ = [
    "CaseArrays",
    "CaseDataset",
    "load_split",
    "loop_settings",
    "model_input",
    "positive_probability",
    "predict_proba",
    "read_params",
    "run_train_classify",
    "split_metrics",
]


@dataclass
class CaseArrays:
    """One split in memory: model inputs (N, ...), labels (N,) and case ids."""

    inputs: np.ndarray
    labels: np.ndarray
    case_ids: list[str]


class CaseDataset(Dataset):
    """(input tensor, label) pairs; ``transform`` is re-seeded per item from the torch RNG."""

    def __init__(self, data: CaseArrays, transform: Callable | None = None) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.asarray(self.data.inputs[index], dtype=np.float32))
        if self.transform is not None:
            self.transform.set_random_state(int(torch.randint(0, 2**31 - 1, ()).item()))
            x = convert_to_tensor(self.transform(x), track_meta=False, dtype=torch.float32)
        return x, int(self.data.labels[index])


def model_input(arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    """The array a model takes from one cache entry: views (V, C, H, W) or volume (1, X, Y, Z)."""
    if key not in arrays:
        hint = " (set preprocess.cache_volume: true and rerun preprocess)" if key == "volume" else ""
        raise KeyError(f"the cache entry has no {key!r} array{hint}")
    array = arrays[key].astype(np.float32)
    return array[None] if key == "volume" else array


def read_params(prep_dir: Path) -> dict[str, Any]:
    """``params.json`` of a preprocess run."""
    return json.loads((prep_dir / "params.json").read_text(encoding="utf-8"))


def load_split(prep_dir: Path, split: str, key: str) -> CaseArrays:
    """The labelled cases of one split that have a cache entry, stacked in ``cases.csv`` order."""
    with (prep_dir / "cases.csv").open(newline="", encoding="utf-8") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["split"] == split and r["status"] in ("ok", "skipped") and r["label"] != ""
        ]
    if not rows:
        raise ValueError(f"{prep_dir / 'cases.csv'}: no labelled, cached cases in split {split!r}")
    inputs = np.stack([model_input(load_entry(prep_dir / r["cache"])[0], key) for r in rows])
    return CaseArrays(inputs, np.array([int(r["label"]) for r in rows]), [r["case_id"] for r in rows])


@torch.no_grad()
def predict_proba(
    model: nn.Module, inputs: np.ndarray, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Softmax class probabilities (N, K) of a model in eval mode."""
    model.eval()
    out = [
        torch.softmax(model(torch.from_numpy(inputs[i : i + batch_size]).float().to(device)), 1).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(out).numpy()


def positive_probability(proba: np.ndarray) -> np.ndarray:
    """The positive-class score of a binary problem (N, 2) → (N,); other K keep (N, K)."""
    return proba[:, 1] if proba.shape[1] == 2 else proba


def split_metrics(labels: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """AUC (NaN with one class present), accuracy and balanced accuracy at argmax."""
    prediction = proba.argmax(1)
    try:
        auc = float(roc_auc_score(labels, positive_probability(proba), multi_class="ovr"))
    except ValueError:
        auc = float("nan")
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(labels, prediction)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, prediction)),
    }


def loop_settings(cfg: ClassifyConfig, progress: bool = True) -> LoopSettings:
    """The shared loop's settings from the classify config."""
    return LoopSettings(
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        scheduler=cfg.scheduler,
        patience=cfg.patience,
        monitor=cfg.monitor,
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        device=cfg.device,
        progress=progress,
    )


@distributed.process_group()
def run_train_classify(config: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the configured classifier on ``RUN/preprocess``; return ``RUN/classify``."""
    cfg = config.classify.model_copy(update={"device": distributed.device_for(config.classify.device)})
    prep, out = config.run_dir / "preprocess", config.run_dir / "classify"
    out.mkdir(parents=True, exist_ok=True)
    params = read_params(prep)
    spec = model_spec(cfg.model)
    train, val = load_split(prep, "train", spec.input), load_split(prep, "val", spec.input)
    classes = (
        params.get("classes") or config.data.classes or [str(k) for k in range(int(train.labels.max()) + 1)]
    )
    num_classes = max(len(classes), 2)

    seed_everything(cfg.seed)
    in_channels = int(train.inputs.shape[2 if spec.input == "views" else 1])
    model = build_model(cfg, in_channels, num_classes)
    balancing = balance(
        cfg.balance,
        train.labels,
        num_classes,
        oversample_ratio=cfg.oversample_ratio,
        undersample_ratio=cfg.undersample_ratio,
        focal_gamma=cfg.focal_gamma,
    )
    if distributed.is_main():
        with atomic_path(out / "balance.json") as tmp:
            tmp.write_text(json.dumps(balancing.report(classes), indent=2), encoding="utf-8")
    if not cfg.augment:
        transform = None
    elif spec.input == "views":
        mode = params.get("preprocess", {}).get("views", {}).get("mode", config.preprocess.views.mode)
        transform = view_augmentation(cfg, flip_channels=mode in ("slice", "slab"))
    else:
        transform = volume_augmentation(cfg)
    dataset = CaseDataset(train, transform)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=distributed.shard(balancing.sampler, dataset, cfg.seed),
        num_workers=cfg.workers,
        drop_last=len(train.labels) > cfg.batch_size * distributed.world_size(),
    )

    def validate(net: nn.Module) -> dict[str, float]:
        return split_metrics(val.labels, predict_proba(net, val.inputs, device=cfg.device))

    if distributed.is_main():
        save_config(config, out / "config.yaml")
    meta = {
        "task": "classify",
        "model": cfg.model,
        "input": spec.input,
        "in_channels": in_channels,
        "classes": classes,
        "classify": cfg.model_dump(mode="json"),
        "preprocess": params.get("preprocess", config.preprocess.model_dump(mode="json")),
        "io": params.get("io", config.io.model_dump(mode="json")),
        "balance": balancing.report(classes),
    }
    fit(
        model,
        loader,
        balancing.loss.to(cfg.device),
        validate,
        out,
        loop_settings(cfg, progress),
        meta=meta,
        resume=resume,
    )
    return out
