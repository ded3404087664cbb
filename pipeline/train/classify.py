"""The classify training stage: ``RUN/preprocess`` cache → ``RUN/classify`` (best checkpoint and logs).

``run_train_classify`` reads ``cases.csv`` and ``params.json``, loads the cache arrays the model
needs (views or volume) into memory, balances the training split (``pipeline.balance``), augments
it (``pipeline.augment``), and trains with the shared loop, early-stopping on the validation metric
``classify.monitor``. It writes ``RUN/classify/{checkpoint.pt, checkpoint.json, last_state.pt,
history.csv, balance.json, config.yaml, tb/}``.

With ``classify.folds`` K > 1 it trains a cross-validation ensemble instead (as nnU-Net does): the
train split is cut into K stratified folds that keep each patient in one fold, one model per fold
trains on the other K - 1 and keeps its best epoch on its own fold (``RUN/classify/fold<k>/``), and
``checkpoint.pt`` holds all K as one ``Ensemble`` whose prediction is their mean probability. Every
training case also gets an out-of-fold probability (``oof_predictions.csv``) from the member that
never saw it: a held-out score for each of the training cases, which the evaluate stage can use to
choose the decision threshold on far more cases than the val split has. ``classify.fold_workers``
trains that many folds at once in local processes, sharing the torch threads between them.

Under ``torchrun`` it trains with DDP (``pipeline.train.distributed``): ``batch_size`` is per process,
each rank draws its share of the balanced sampler (``weighted_sampler``: MONAI's
``DistributedWeightedRandomSampler``) and rank 0 writes the files.

Example:
    >>> out = run_train_classify(load_config("cfg.yaml"))      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.augment import require_whole_volume_slabs, view_augmentation, volume_augmentation
from pipeline.balance import Balancing, balance
from pipeline.checkpoint import save_checkpoint
from pipeline.config import ClassifyConfig, Config, PreprocessConfig, save_config
from pipeline.folder_lock import folder_lock
from pipeline.io import atomic_path, float_text, remove_stale_temps, write_json
from pipeline.models import build_model, ignored_settings, model_spec
from pipeline.models.ensemble import Ensemble
from pipeline.preprocess.cache import load_entry
from pipeline.train import distributed
from pipeline.train.loop import (
    FitResult,
    LoopSettings,
    clear_earlier_run,
    fit,
    seed_everything,
    write_history,
)
from pipeline.train.resume import check_resume

__all__ = [
    "CaseArrays",
    "CaseDataset",
    "cache_inputs",
    "check_models",
    "fold_indices",
    "load_split",
    "loop_settings",
    "model_input",
    "positive_probability",
    "predict_proba",
    "read_params",
    "run_train_classify",
    "split_metrics",
    "split_rows",
]
TRAINING_SECTIONS = ("classify",)  # the config sections that say what a run trains (train.resume)


@dataclass
class CaseArrays:
    """One split in memory: model inputs (N, ...), labels (N,) and case ids."""

    inputs: np.ndarray
    labels: np.ndarray
    case_ids: list[str]
    groups: list[str] = field(default_factory=list)  # patient ids (the case id where none is known)

    def subset(self, index: np.ndarray) -> CaseArrays:
        """The cases at ``index``, in that order."""
        pick = [int(i) for i in index]
        return CaseArrays(
            self.inputs[index],
            self.labels[index],
            [self.case_ids[i] for i in pick],
            [self.groups[i] for i in pick] if self.groups else [],
        )


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
        raise ValueError(f"the cache entry has no {key!r} array{hint}")
    array = arrays[key].astype(np.float32)
    return array[None] if key == "volume" else array


def read_params(prep_dir: Path) -> dict[str, Any]:
    """``params.json`` of a preprocess run; a clear error where preprocess has not run."""
    path = prep_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `medpipe preprocess` on this run first")
    return json.loads(path.read_text(encoding="utf-8"))


def cache_inputs(config: Config) -> dict[str, Any]:
    """The preprocessing and read settings of the run's cache, as a checkpoint records them (and a
    resumed training must find them)."""
    params = read_params(config.run_dir / "preprocess")
    return {
        "preprocess": params.get("preprocess", config.preprocess.model_dump(mode="json")),
        "io": params.get("io", config.io.model_dump(mode="json")),
    }


def split_rows(prep_dir: Path, split: str) -> tuple[list[dict[str, str]], list[str]]:
    """The ``cases.csv`` rows of one split's labelled cases that have a cache entry, and the ids of
    those preprocessing failed on."""
    with (prep_dir / "cases.csv").open(newline="", encoding="utf-8") as fh:
        labelled = [r for r in csv.DictReader(fh) if r["split"] == split and r["label"] != ""]
    cached = [r for r in labelled if r["status"] in ("ok", "skipped")]
    return cached, [r["case_id"] for r in labelled if r["status"] not in ("ok", "skipped")]


def load_split(prep_dir: Path, split: str, key: str) -> CaseArrays:
    """The labelled cases of one split that have a cache entry, stacked in ``cases.csv`` order."""
    rows, _ = split_rows(prep_dir, split)
    if not rows:
        raise ValueError(f"{prep_dir / 'cases.csv'}: no labelled, cached cases in split {split!r}")
    inputs = np.stack([model_input(load_entry(prep_dir / r["cache"])[0], key) for r in rows])
    return CaseArrays(
        inputs,
        np.array([int(r["label"]) for r in rows]),
        [r["case_id"] for r in rows],
        [r.get("patient_id") or r["case_id"] for r in rows],
    )


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
    with warnings.catch_warnings():  # a one-class split: training has already said so
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        try:
            auc = float(roc_auc_score(labels, positive_probability(proba), multi_class="ovr"))
        except ValueError:
            auc = float("nan")
        balanced = float(balanced_accuracy_score(labels, prediction))
    return {"auc": auc, "accuracy": float(accuracy_score(labels, prediction)), "balanced_accuracy": balanced}


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
        precision=cfg.train_precision,
        progress=progress,
    )


def fold_indices(data: CaseArrays, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out case indices of ``folds`` stratified folds that keep each patient in one fold."""
    groups = data.groups or data.case_ids
    by_class = {c: {g for g, y in zip(groups, data.labels, strict=True) if y == c} for c in set(data.labels)}
    smallest = min(len(patients) for patients in by_class.values())
    if folds > smallest:
        raise ValueError(
            f"classify.folds {folds} needs at least {folds} patients of every class in the train split; "
            f"the smallest class has {smallest}"
        )
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(data.inputs[:, :0], data.labels, groups)]


def check_models(cfg: ClassifyConfig, preprocess: PreprocessConfig) -> None:
    """Every model of the run takes the input of ``classify.model``, and the cache holds it."""
    want = model_spec(cfg.model).input
    if want == "volume" and not preprocess.cache_volume:
        raise ValueError(
            f"classify model {cfg.model} takes the whole volume, which this run's cache does not hold; "
            "set preprocess.cache_volume: true and rerun preprocess"
        )
    for model_cfg in cfg.fold_models():
        spec = model_spec(model_cfg.model)
        if spec.input != want:
            raise ValueError(
                f"classify.extra_models: {model_cfg.model} takes the {spec.input}, {cfg.model} the {want}; "
                "an ensemble's models must share one input"
            )
        if spec.whole_volume:
            require_whole_volume_slabs(
                preprocess.views, preprocess.shape, f"classify model {model_cfg.model}"
            )
    if distributed.is_main():
        for name, keys in ignored_settings(cfg).items():
            print(
                f"warning: classify model {name} does not read classify.{', classify.'.join(keys)}",
                file=sys.stderr,
            )


def _augmentation(cfg: ClassifyConfig, input_key: str, preprocess: PreprocessConfig) -> Callable | None:
    if not cfg.augment:
        return None
    if input_key == "views":
        return view_augmentation(cfg, preprocess.views, preprocess.shape)
    return volume_augmentation(cfg)


@dataclass(frozen=True)
class _Training:
    """What every model of one training run shares."""

    cfg: ClassifyConfig
    transform: Callable | None
    meta: dict[str, Any]  # the checkpoint sidecar's common part
    resume: bool
    progress: bool
    invalidates: tuple[Path, ...] = ()  # the evaluation of the model this run replaces


def _balancing(cfg: ClassifyConfig, labels: np.ndarray, num_classes: int) -> Balancing:
    """The configured class balancing of a training split."""
    return balance(
        cfg.balance,
        labels,
        num_classes,
        oversample_ratio=cfg.oversample_ratio,
        undersample_ratio=cfg.undersample_ratio,
        focal_gamma=cfg.focal_gamma,
    )


def lone_last_case(per_epoch: int, batch_size: int) -> bool:
    """Whether an epoch's last batch would hold one case after full ones: BatchNorm cannot train on
    one, so it is dropped (``drop_last``); any larger remainder is trained on."""
    return per_epoch > batch_size and per_epoch % batch_size == 1


def _fit_member(run: _Training, train: CaseArrays, val: CaseArrays, out: Path) -> tuple[nn.Module, FitResult]:
    """Balance, augment and train one model on ``train``, keeping its best epoch on ``val``."""
    cfg, meta = run.cfg, run.meta
    classes = meta["classes"]
    num_classes = max(len(classes), 2)
    seed_everything(cfg.seed)
    model = build_model(cfg, meta["in_channels"], num_classes)
    balancing = _balancing(cfg, train.labels, num_classes)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        write_json(out / "balance.json", balancing.report(classes))
    dataset = CaseDataset(train, run.transform)
    sampler = distributed.shard(balancing.sampler, dataset, cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        drop_last=lone_last_case(len(sampler), cfg.batch_size),
    )

    def validate(net: nn.Module) -> dict[str, float]:
        return split_metrics(val.labels, predict_proba(net, val.inputs, device=cfg.device))

    result = fit(
        model,
        loader,
        balancing.loss.to(cfg.device),
        validate,
        out,
        loop_settings(cfg, run.progress),
        meta={**meta, "classify": cfg.model_dump(mode="json"), "balance": balancing.report(classes)},
        resume=run.resume,
        invalidates=run.invalidates,
    )
    return model, result


# The train split of the fold jobs run in this process, set once per process by ``_share_split``, so
# a fold job carries its held-out indices instead of its own copy of the arrays.
_SPLIT: dict[str, CaseArrays] = {}


def _share_split(train: CaseArrays, threads: int) -> None:
    """Give this process the train split and its share of the torch threads (a pool initializer)."""
    _SPLIT["train"] = train
    torch.set_num_threads(threads)


def _fit_fold(job: tuple[_Training, np.ndarray, Path]) -> tuple[nn.Module, FitResult]:
    """``_fit_member`` on the shared train split less the ``held`` cases, validated on them (top
    level: picklable for a local process)."""
    run, held, out = job
    train = _SPLIT["train"]
    rest = np.setdiff1d(np.arange(len(train.labels)), held)
    return _fit_member(run, train.subset(rest), train.subset(held), out)


def _fit_folds_in_processes(
    jobs: list[tuple[_Training, np.ndarray, Path]], train: CaseArrays, workers: int
) -> list[tuple[nn.Module, FitResult]]:
    """``_fit_fold`` over ``jobs`` on ``workers`` local processes, each given the train split once.

    The workers start with SIGINT ignored (an ignored signal stays ignored across their spawn), so
    Ctrl-C is the parent's alone: it stops the folds in flight at once (each resumes from its last
    finished epoch) and drops the queued ones, instead of training those to the end.
    """
    context = multiprocessing.get_context("spawn")
    share = (train, max(1, torch.get_num_threads() // workers))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = context.Pool(workers, initializer=_share_split, initargs=share)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        results = pool.map(_fit_fold, jobs, chunksize=1)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()
    return results


def _mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean of every column over the folds that ran it (``seconds`` summed)."""
    rows = []
    for epoch in range(max(len(h) for h in histories)):
        present = [h[epoch] for h in histories if epoch < len(h)]
        row: dict[str, float] = {"epoch": epoch}
        for key in present[0]:
            if key != "epoch":
                values = [float(r[key]) for r in present]
                row[key] = float(np.sum(values) if key == "seconds" else np.mean(values))
        rows.append(row)
    return rows


def _train_folds(run: _Training, train: CaseArrays, val: CaseArrays, out: Path) -> None:
    """The cross-validation ensemble: one member per fold (and per model of ``fold_models``), each
    validated on its held-out fold.

    Writes ``fold<k>/`` per member (``fold<k>_<j>_<model>/`` for the j-th extra model), the ensemble
    ``checkpoint.pt`` (members model by model, fold by fold), ``oof_predictions.csv`` (each training
    case scored by the members that did not see it), the member-mean ``history.csv`` and the whole
    training split's ``balance.json``.
    """
    cfg, meta = run.cfg, run.meta
    folds = fold_indices(train, cfg.folds, cfg.seed)
    models = cfg.fold_models()
    workers = 1 if distributed.is_distributed() else min(cfg.fold_workers, len(folds) * len(models))
    jobs = [
        (
            replace(
                run,
                cfg=model_cfg.model_copy(
                    update={
                        "seed": (cfg.seed * len(models) + j) * cfg.folds + k,
                        "folds": 1,
                        "extra_models": [],
                    }
                ),
                meta={**meta, "folds": 1, "model": model_cfg.model},
                progress=run.progress and workers == 1,
            ),
            held,
            out / (f"fold{k}" if j == 0 else f"fold{k}_{j}_{model_cfg.model}"),
        )
        for j, model_cfg in enumerate(models)
        for k, held in enumerate(folds)
    ]
    if workers > 1:
        results = _fit_folds_in_processes(jobs, train, workers)
    else:
        _share_split(train, torch.get_num_threads())
        try:
            results = [_fit_fold(job) for job in jobs]
        finally:
            _SPLIT.clear()
    oof = np.zeros(len(train.labels))
    for held, (model, _) in zip(folds * len(models), results, strict=True):
        oof[held] += positive_probability(predict_proba(model, train.inputs[held], device=cfg.device))
    oof /= len(models)
    ensemble = Ensemble(model for model, _ in results)
    histories, epochs = [r.history for _, r in results], [r.best_epoch for _, r in results]
    if not distributed.is_main():
        return
    val_metrics = split_metrics(val.labels, predict_proba(ensemble, val.inputs, device=cfg.device))
    balancing = _balancing(cfg, train.labels, max(len(meta["classes"]), 2))
    write_json(out / "balance.json", balancing.report(meta["classes"]))
    save_checkpoint(
        out / "checkpoint.pt",
        ensemble,
        {
            **meta,
            "classify": cfg.model_dump(mode="json"),
            "epoch": None,
            "fold_epochs": epochs,
            "val_metrics": val_metrics,
        },
    )
    with atomic_path(out / "oof_predictions.csv") as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case_id", "label", "fold", "probability"])
        fold_of = {int(i): k for k, held in enumerate(folds) for i in held}
        for i, cid in enumerate(train.case_ids):
            writer.writerow([cid, int(train.labels[i]), fold_of[i], float_text(oof[i])])
    write_history(out / "history.csv", _mean_history(histories))


@distributed.process_group()
def run_train_classify(config: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the classifier (or its ``folds`` ensemble) on ``RUN/preprocess``; return ``RUN/classify``."""
    cfg = config.classify.model_copy(update={"device": distributed.device_for(config.classify.device)})
    prep, out = config.run_dir / "preprocess", config.run_dir / "classify"
    params = read_params(prep)
    with contextlib.ExitStack() as locks:
        if distributed.is_main():  # the other ranks of a torchrun train under rank 0's locks
            locks.enter_context(folder_lock(out))
            locks.enter_context(folder_lock(prep, shared=True))
        out.mkdir(parents=True, exist_ok=True)
        spec = model_spec(cfg.model)
        train, val = load_split(prep, "train", spec.input), load_split(prep, "val", spec.input)
        classes = (
            params.get("classes")
            or config.data.classes
            or [str(k) for k in range(int(train.labels.max()) + 1)]
        )
        preprocess = (
            PreprocessConfig.model_validate(params["preprocess"])
            if "preprocess" in params
            else config.preprocess
        )
        check_models(cfg, preprocess)
        if len(present := np.unique(train.labels)) < 2:
            only = classes[int(present[0])] if len(present) else "no case"
            raise ValueError(
                f"{prep / 'cases.csv'}: the train split holds one class only ({only}, {len(train.labels)} "
                "cases); a classifier needs cases of every class to learn from"
            )
        if len(classes) > 2 and distributed.is_main():
            counts = ", ".join(f"{name} {int(np.sum(train.labels == k))}" for k, name in enumerate(classes))
            print(
                f"warning: {prep / 'cases.csv'}: {len(classes)} classes (train cases: {counts}); the model "
                "trains on them all, but evaluate classify and the report handle two classes only",
                file=sys.stderr,
            )
        if len(np.unique(val.labels)) < 2 and distributed.is_main():
            print(
                f"warning: {prep / 'cases.csv'}: the val split holds one class only ({len(val.labels)} "
                "cases), so validation AUC is undefined and the last epoch is kept instead of the best",
                file=sys.stderr,
            )
        transform = _augmentation(cfg, spec.input, preprocess)
        from pipeline.evaluate.classification import OUTPUTS as EVALUATION  # evaluate imports this module

        inputs = cache_inputs(config)
        resume = resume and check_resume(out, config, TRAINING_SECTIONS, inputs)
        if distributed.is_main():
            remove_stale_temps(out)  # what a killed fold worker was writing
            if not resume:  # nothing of an earlier model or ensemble may be resumed or read as this run's
                clear_earlier_run(out)
                for member in (d for d in out.glob("fold*") if d.is_dir()):
                    shutil.rmtree(member)
                for name in ("oof_predictions.csv", "balance.json"):
                    (out / name).unlink(missing_ok=True)
            save_config(config, out / "config.yaml")
        meta = {
            "task": "classify",
            "model": cfg.model,
            "input": spec.input,
            "in_channels": int(train.inputs.shape[2 if spec.input == "views" else 1]),
            "classes": classes,
            "folds": cfg.folds,
            **inputs,
        }
        run = _Training(cfg, transform, meta, resume, progress, tuple(out / name for name in EVALUATION))
        if cfg.folds == 1:
            _fit_member(run, train, val, out)
        else:
            _train_folds(run, train, val, out)
        return out
