"""Class balancing: one function per strategy, one registry, and a report of the class counts.

Every strategy returns a ``Balancing``: the ``sampler`` the training DataLoader uses, the ``loss``,
and the class counts before balancing and per epoch after it (expected counts for random samplers).

- ``none``: plain shuffling, cross-entropy.
- ``weighted_sampler``: ``WeightedRandomSampler`` with inverse class frequency, with replacement, so
  classes are drawn equally often; the training set augments at random, so repeats differ.
- ``oversample_augment``: minority cases repeated until each class has ``oversample_ratio`` times
  the majority count, the repeats drawn afresh each epoch; every copy goes through the random
  augmentation.
- ``undersample``: each epoch keeps every case of the smallest class and a fresh random subset of at
  most ``undersample_ratio`` times that many of every other class.
- ``class_weighted_loss``: cross-entropy weighted by inverse class frequency.
- ``focal``: MONAI ``FocalLoss`` (softmax, ``focal_gamma``), each class weighted by inverse frequency.

Example:
    >>> b = balance("weighted_sampler", np.array([0, 0, 0, 1]), num_classes=2)
    >>> b.after
    {0: 2.0, 1: 2.0}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.losses import FocalLoss
from torch import nn
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

__all__ = ["STRATEGIES", "Balancing", "OversampleSampler", "UndersampleSampler", "balance", "class_counts"]


@dataclass
class Balancing:
    """A strategy's sampler and loss, with class counts before and (per epoch) after balancing."""

    strategy: str
    sampler: Sampler[int]
    loss: nn.Module
    before: dict[int, int]
    after: dict[int, float]

    def report(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """A JSON-ready summary, with class names as keys when given."""

        def name(k: int) -> str:
            return class_names[k] if class_names else str(k)

        return {
            "strategy": self.strategy,
            "before": {name(k): v for k, v in self.before.items()},
            "after_per_epoch": {name(k): v for k, v in self.after.items()},
            "loss": type(self.loss).__name__,
        }


def class_counts(labels: np.ndarray, num_classes: int) -> dict[int, int]:
    """Count of each class index in ``labels``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return {k: int(c) for k, c in enumerate(counts)}


def _inverse_frequency(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """n / (K * count_k): weights that are 1 for a balanced set; empty classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)


class _SoftmaxFocal(nn.Module):
    """MONAI ``FocalLoss`` on (B, K) logits and (B,) integer targets, each class weighted by
    ``weight`` (the alpha-balanced focal loss of Lin et al. 2017, with per-class alphas). The batch's
    loss is normalised by its cases' weights as ``nn.CrossEntropyLoss(weight=...)`` is, so with gamma
    0 the two are equal (MONAI's own mean also divides by K)."""

    def __init__(self, gamma: float, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.focal = FocalLoss(
            to_onehot_y=True, use_softmax=True, gamma=gamma, weight=weight, reduction="none"
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.focal(logits, target.view(-1, 1)).sum() / self.weight[target].sum()


class UndersampleSampler(Sampler[int]):
    """Per epoch: all cases of the smallest class plus a fresh random subset of each other class.

    Each other class keeps at most ``ratio`` × (smallest class count) cases. Uses the global torch
    RNG, so the loop's seeding and resume make it deterministic.
    """

    def __init__(self, labels: np.ndarray, ratio: float = 1.0) -> None:
        self.by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
        smallest = min(len(idx) for idx in self.by_class)
        self.keep = [min(len(idx), round(ratio * smallest)) for idx in self.by_class]

    def __len__(self) -> int:
        return sum(self.keep)

    def __iter__(self) -> Iterator[int]:
        chosen = [
            idx[torch.randperm(len(idx))[:k].numpy()] for idx, k in zip(self.by_class, self.keep, strict=True)
        ]
        order = np.concatenate(chosen)[torch.randperm(len(self)).numpy()]
        return iter(order.tolist())


class OversampleSampler(Sampler[int]):
    """Per epoch: every case once, plus fresh repeats of each smaller class up to ``target`` cases.

    A class's repeats go round its cases in a new random order each epoch, so no case is repeated
    twice more than another, and which cases get the extra repeat changes from epoch to epoch. Uses
    the global torch RNG (or ``draw``'s generator, which the distributed form seeds per epoch).
    """

    def __init__(self, labels: np.ndarray, target: int) -> None:
        self.target = target
        self.size = len(labels)
        self.by_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]

    def __len__(self) -> int:
        return self.size + sum(max(self.target - len(idx), 0) for idx in self.by_class)

    def draw(self, generator: torch.Generator | None = None) -> np.ndarray:
        """One epoch's indices, in no particular order."""
        indices = [np.arange(self.size)]
        for idx in self.by_class:
            if (extra := self.target - len(idx)) > 0:
                rounds = -(-extra // len(idx))
                order = [idx[torch.randperm(len(idx), generator=generator).numpy()] for _ in range(rounds)]
                indices.append(np.concatenate(order)[:extra])
        return np.concatenate(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw()[torch.randperm(len(self)).numpy()].tolist())


def _none(labels: np.ndarray, num_classes: int, **_: Any) -> Balancing:
    before = class_counts(labels, num_classes)
    return Balancing(
        "none",
        RandomSampler(range(len(labels))),
        nn.CrossEntropyLoss(),
        before,
        {k: float(v) for k, v in before.items()},
    )


def _weighted_sampler(labels: np.ndarray, num_classes: int, **_: Any) -> Balancing:
    weights = _inverse_frequency(labels, num_classes)[labels]
    present = sum(1 for c in class_counts(labels, num_classes).values() if c)
    after = {k: (len(labels) / present if c else 0.0) for k, c in class_counts(labels, num_classes).items()}
    return Balancing(
        "weighted_sampler",
        WeightedRandomSampler(weights.double(), len(labels), replacement=True),
        nn.CrossEntropyLoss(),
        class_counts(labels, num_classes),
        after,
    )


def _oversample_augment(
    labels: np.ndarray, num_classes: int, oversample_ratio: float = 1.0, **_: Any
) -> Balancing:
    counts = class_counts(labels, num_classes)
    sampler = OversampleSampler(labels, round(oversample_ratio * max(counts.values())))
    after = {k: float(max(count, sampler.target) if count else 0) for k, count in counts.items()}
    return Balancing("oversample_augment", sampler, nn.CrossEntropyLoss(), counts, after)


def _undersample(labels: np.ndarray, num_classes: int, undersample_ratio: float = 1.0, **_: Any) -> Balancing:
    sampler = UndersampleSampler(labels, undersample_ratio)
    after = dict.fromkeys(range(num_classes), 0.0)
    for idx, keep in zip(sampler.by_class, sampler.keep, strict=True):
        after[int(labels[idx[0]])] = float(keep)
    return Balancing("undersample", sampler, nn.CrossEntropyLoss(), class_counts(labels, num_classes), after)


def _class_weighted_loss(labels: np.ndarray, num_classes: int, **_: Any) -> Balancing:
    before = class_counts(labels, num_classes)
    loss = nn.CrossEntropyLoss(weight=_inverse_frequency(labels, num_classes))
    return Balancing(
        "class_weighted_loss",
        RandomSampler(range(len(labels))),
        loss,
        before,
        {k: float(v) for k, v in before.items()},
    )


def _focal(labels: np.ndarray, num_classes: int, focal_gamma: float = 2.0, **_: Any) -> Balancing:
    before = class_counts(labels, num_classes)
    return Balancing(
        "focal",
        RandomSampler(range(len(labels))),
        _SoftmaxFocal(focal_gamma, _inverse_frequency(labels, num_classes)),
        before,
        {k: float(v) for k, v in before.items()},
    )


STRATEGIES: dict[str, Callable[..., Balancing]] = {
    "none": _none,
    "weighted_sampler": _weighted_sampler,
    "oversample_augment": _oversample_augment,
    "undersample": _undersample,
    "class_weighted_loss": _class_weighted_loss,
    "focal": _focal,
}


def balance(strategy: str, labels: np.ndarray, num_classes: int, **options: float) -> Balancing:
    """Apply a strategy to the training labels; options: oversample_ratio, undersample_ratio, focal_gamma."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown balance strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](np.asarray(labels, dtype=np.int64), num_classes, **options)
