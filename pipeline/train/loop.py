"""The shared, task-agnostic training loop (classification and segmentation use the same one).

``fit`` runs epochs of AdamW with a cosine or plateau LR schedule, calls a validation callable after
each epoch (on an exponential moving average of the weights if ``ema_decay`` is set), keeps the best
epoch (the monitored metric is maximised) as a safe checkpoint (``pipeline.checkpoint``), stops
early after ``patience`` epochs without improvement, and writes into ``out_dir``:

- ``checkpoint.pt`` + ``checkpoint.json``: best-epoch weights and sidecar (``meta`` + epoch, metrics);
- ``last_state.pt``: model, optimizer, scheduler, epoch, history and RNG states, written atomically
  after every epoch, so ``resume=True`` continues an interrupted run exactly where it stopped;
- ``history.csv``: epoch, train_loss, every validation metric, lr, seconds;
- ``tb/``: TensorBoard event files with the same scalars.

A fresh start (no ``resume``) first deletes every file above that an earlier run left, and the
files in ``invalidates`` (an evaluation of the weights this run replaces) are deleted before the
first epoch that runs, so resuming a finished run keeps them.

``precision="bfloat16"`` runs the training forward pass under bfloat16 autocast
(``pipeline.train.precision``); the loss, gradients and weights stay float32.

Under ``torchrun`` (``pipeline.train.distributed``) the model trains in DistributedDataParallel and
the loader's distributed sampler is reseeded every epoch; ``train_loss`` is the mean over the ranks.
Rank 0 alone validates, on the full validation set, and hands the metrics to every rank, so all
ranks take the same scheduler, best-epoch and early-stopping decisions; rank 0 alone writes the
files above and shows the progress bar. Each rank seeds its RNGs with ``seed + rank`` and its RNG
states are kept in ``last_state.pt``; every rank resumes from that file.

Batches are ``(inputs, targets)`` sequences or dicts with ``"image"`` and ``"label"`` keys (MONAI
style); pass ``unpack`` for anything else. ``loss_fn(model(inputs), targets)`` must return a scalar.

Example:
    >>> from pipeline.train.loop import LoopSettings, fit
    >>> def validate(model):                        # any callable: model -> {name: value}
    ...     return {"dice": dice_on(model, val_loader)}
    >>> result = fit(                                                        # doctest: +SKIP
    ...     model, train_loader, torch.nn.CrossEntropyLoss(), validate, out_dir=run / "segment",
    ...     settings=LoopSettings(epochs=30, lr=1e-3, monitor="dice", patience=8, seed=0),
    ...     meta={"config": config.model_dump(mode="json")},
    ... )
    >>> result.best_epoch, result.best_metric, result.checkpoint            # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from pipeline.checkpoint import load_state, save_checkpoint, save_state, sidecar_path
from pipeline.config import Precision
from pipeline.io import atomic_path
from pipeline.train import distributed
from pipeline.train.precision import autocast

__all__ = [
    "FitResult",
    "LoopSettings",
    "clear_earlier_run",
    "fit",
    "rng_states",
    "seed_everything",
    "set_rng_states",
    "unpack_batch",
    "write_history",
]

Validate = Callable[[nn.Module], Mapping[str, float]]
CHECKPOINT, LAST_STATE = "checkpoint.pt", "last_state.pt"


@dataclass
class LoopSettings:
    """Optimisation and bookkeeping options of ``fit``."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    min_lr: float = 1e-6
    patience: int | None = 10  # early stopping: epochs without improvement; None = never stop early
    monitor: str = "auc"  # key of the validation metrics, maximised
    grad_clip: float | None = None
    ema_decay: float | None = None  # keep an exponential moving average of the weights; validate and save it
    seed: int = 0
    device: str = "cpu"
    precision: Precision = "float32"  # of the training forward pass (pipeline.train.precision)
    progress: bool = True


@dataclass
class FitResult:
    """What ``fit`` produced; ``model`` holds the best epoch's weights when it returns."""

    best_epoch: int
    best_metric: float
    epochs_run: int
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states, as tensors and plain numbers (``weights_only``-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    states: dict[str, Any] = {
        "python": [*internal, version, python_gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore states taken by ``rng_states``."""
    *internal, version, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def unpack_batch(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) from a ``(x, y, ...)`` sequence or an ``{"image", "label"}`` dict."""
    if isinstance(batch, Mapping):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def clear_earlier_run(out: Path) -> None:
    """A fresh start's clean slate: an earlier run's best checkpoint, resume state, history and
    TensorBoard events must not survive to be taken for this run's."""
    ckpt = out / CHECKPOINT
    for stale in (ckpt, sidecar_path(ckpt), out / LAST_STATE, out / "history.csv"):
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "tb", ignore_errors=True)


def _check_schedule_length(last: Path, saved: Mapping[str, Any], s: LoopSettings) -> None:
    """Refuse to resume a cosine schedule under a different epoch count: the saved schedule would
    either end early or, past its end, swing the LR back up."""
    span = saved.get("T_max") if s.scheduler == "cosine" else None
    if span is not None and span != s.epochs:
        raise ValueError(
            f"{last}: this run's cosine LR schedule spans {span} epochs and --resume continues it; "
            f"resume with --epochs {span}, or train for {s.epochs} epochs afresh without --resume"
        )


def _scheduler(optimizer: torch.optim.Optimizer, s: LoopSettings) -> Any:
    if s.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs, eta_min=s.min_lr)
    if s.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=s.plateau_factor, patience=s.plateau_patience, min_lr=s.min_lr
        )
    return None


def _score(metrics: Mapping[str, float], monitor: str) -> float:
    if monitor not in metrics:
        raise KeyError(f"validation returned {sorted(metrics)}, not the monitored metric {monitor!r}")
    value = float(metrics[monitor])
    return value if math.isfinite(value) else -math.inf


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """Write per-epoch rows as ``history.csv`` (atomically), with every key any row has as a column."""
    fields = list(dict.fromkeys(key for row in history for key in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def _train_epoch(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    s: LoopSettings,
    device: torch.device,
    unpack: Callable[[Any], tuple[Any, Any]],
    ema: AveragedModel | None,
) -> float:
    model.train()
    total, count = 0.0, 0
    for batch in loader:
        inputs, targets = (_to(v, device) for v in unpack(batch))
        optimizer.zero_grad(set_to_none=True)
        with autocast(s.precision, device.type):
            outputs = model(inputs)
        loss = loss_fn(outputs.float(), targets)
        loss.backward()
        if s.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        n = len(targets) if hasattr(targets, "__len__") else 1
        total += float(loss.detach()) * n
        count += n
    if count == 0:
        raise ValueError("the training loader gave no batch: fewer cases per epoch than one batch?")
    return total / count


def fit(
    model: nn.Module,
    train_loader: Iterable,
    loss_fn: Callable[..., torch.Tensor],
    validate: Validate,
    out_dir: str | Path,
    settings: LoopSettings | None = None,
    *,
    meta: Mapping[str, Any] | None = None,
    resume: bool = False,
    unpack: Callable[[Any], tuple[Any, Any]] = unpack_batch,
    invalidates: Sequence[Path] = (),
) -> FitResult:
    """Train ``model`` and keep its best epoch; see the module docstring for the files written.

    ``validate(model)`` returns a mapping of validation metrics (it should use ``torch.no_grad`` and
    ``model.eval()``; the loop switches back to train mode). ``meta`` goes into the checkpoint
    sidecar. With ``resume=True`` an existing ``last_state.pt`` is continued (a finished run returns
    at once); without it, the run starts from scratch. ``invalidates`` are deleted (rank 0) before
    the first epoch this call runs.
    """
    s = settings or LoopSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(s.device)
    model.to(device)
    net = distributed.wrap(model, device)
    main = distributed.is_main()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = _scheduler(optimizer, s)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
        if s.ema_decay
        else None
    )
    evaluated = ema.module if ema is not None else model
    ckpt, last = out / CHECKPOINT, out / LAST_STATE
    history: list[dict[str, float]] = []
    start, best_epoch, best, stale, stopped = 0, -1, -math.inf, 0, False

    if resume and last.is_file():
        state = load_state(last, device)
        _check_schedule_length(last, state["scheduler"], s)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        ranks = state.get("rank_rng", [])
        same_ranks = len(ranks) == distributed.world_size()
        set_rng_states(ranks[distributed.rank()] if same_ranks else state["rng"])
        if main and ranks and not same_ranks:
            print(
                f"warning: {last}: a run of {len(ranks)} process(es) resumed on {distributed.world_size()}: "
                "the global batch and the steps per epoch change, so it does not continue exactly",
                file=sys.stderr,
            )
        history, start = list(state["history"]), int(state["epoch"]) + 1
        best_epoch, best, stale, stopped = (
            state["best_epoch"],
            state["best"],
            state["stale"],
            state["stopped"],
        )
        if main and (stopped or start >= s.epochs):
            print(
                f"note: {out}: training finished at epoch {start} (best epoch {best_epoch + 1}); "
                "nothing left to resume",
                file=sys.stderr,
            )
    else:
        if main:
            clear_earlier_run(out)
        seed_everything(s.seed + distributed.rank())

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None) if main else None
    bar = tqdm(
        range(start, s.epochs),
        desc="epochs",
        disable=not (s.progress and main),
        initial=start,
        total=s.epochs,
    )
    try:
        for epoch in bar:
            if stopped:
                break
            if epoch == start and main:
                for path in invalidates:
                    path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            distributed.set_epoch(train_loader, epoch)
            train_loss = _train_epoch(net, train_loader, loss_fn, optimizer, s, device, unpack, ema)
            train_loss = distributed.mean(train_loss)
            with torch.no_grad():
                metrics = distributed.from_main(lambda: {k: float(v) for k, v in validate(evaluated).items()})
            model.train()
            score = _score(metrics, s.monitor)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(score if math.isfinite(score) else -1e9)
            elif scheduler is not None:
                scheduler.step()
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in metrics.items()},
                "lr": lr,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            history.append(row)
            # an undefined score (AUC on a one-class val split) keeps the latest epoch until a real one
            improved = score > best or score == best == -math.inf
            if improved:
                best, best_epoch, stale = score, epoch, 0
            else:
                stale += 1
            stopped = s.patience is not None and stale >= s.patience
            rank_rng = distributed.gather(rng_states())
            if not main:
                continue
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch)
            if improved:
                save_checkpoint(
                    ckpt,
                    evaluated,
                    {
                        **(meta or {}),
                        "epoch": epoch,
                        "val_metrics": metrics,
                        "monitor": s.monitor,
                        "loop": asdict(s),
                    },
                )
            write_history(out / "history.csv", history)
            save_state(
                last,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "ema": ema.state_dict() if ema is not None else {},
                    "epoch": epoch,
                    "history": history,
                    "rng": rank_rng[0],
                    "rank_rng": rank_rng,
                    "best_epoch": best_epoch,
                    "best": best,
                    "stale": stale,
                    "stopped": stopped,
                },
            )
            bar.set_postfix(
                loss=f"{train_loss:.4f}", **{s.monitor: f"{metrics[s.monitor]:.4f}"}, best=f"{best:.4f}"
            )
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    distributed.barrier()  # the other ranks read the best checkpoint once rank 0 has written it
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: not found after training; train afresh without --resume")
    model.load_state_dict(load_state(ckpt, device))
    return FitResult(best_epoch, best, len(history), ckpt, history)
