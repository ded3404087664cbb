"""torch DDP plumbing for ``torchrun``: the process group, the wrapped model, per-rank samplers.

Launched by ``torchrun`` (``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` set), ``process_group``
joins the group, on gloo for CPU tensors and NCCL for CUDA tensors, and leaves it afterwards.
Without those variables every function here is a no-op: rank 0 of a world of one, the model
unwrapped, the sampler unchanged. So the same training code runs in one process or under torchrun.

Example:
    >>> @process_group()                                   # doctest: +SKIP
    ... def train(config): ...
    >>> sampler = shard(balancing.sampler, dataset, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from monai.data import DistributedSampler, DistributedWeightedRandomSampler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, RandomSampler, Sampler, WeightedRandomSampler

from pipeline.balance import OversampleSampler

__all__ = [
    "barrier",
    "device_for",
    "from_main",
    "gather",
    "is_distributed",
    "is_main",
    "mean",
    "process_group",
    "rank",
    "set_epoch",
    "shard",
    "world_size",
    "wrap",
]

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies

T = TypeVar("T")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def is_distributed() -> bool:
    """Whether this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is rank 0, the only rank that writes files and logs."""
    return rank() == 0


def _end_with_launcher() -> None:
    """Have the kernel terminate this rank when its torchrun launcher dies (Linux): a launcher
    killed with SIGKILL cannot stop its ranks, which would train on unseen, holding the run's lock.
    The last epoch's resume state is on disk, so ``--resume`` continues from it."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def process_group() -> Iterator[None]:
    """Join the torchrun process group for the block (a no-op outside torchrun); usable as a decorator.

    The backend is gloo, plus NCCL for CUDA tensors when CUDA is available. A group that already
    exists is used as is and left open.
    """
    if is_distributed() or not all(var in os.environ for var in LAUNCH_VARS):
        yield
        return
    _end_with_launcher()
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_for(device: str) -> str:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; others unchanged."""
    if not is_distributed() or not device.startswith("cuda"):
        return device
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (CUDA: with synchronised BatchNorm), or as is.

    On CPU, BatchNorm layers normalise with each rank's own batch statistics (SyncBatchNorm needs
    a GPU), and rank 0's running statistics are broadcast to the others at every forward.
    """
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


class _OversampleShard(DistributedSampler):
    """A shuffled per-rank share of an ``OversampleSampler``'s epoch, which every rank draws alike."""

    def __init__(self, sampler: OversampleSampler, seed: int) -> None:
        super().__init__(range(len(sampler)), shuffle=True, seed=seed)
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        indices = self.sampler.draw(torch.Generator().manual_seed(self.seed + self.epoch))
        return (int(indices[i]) for i in super().__iter__())


def shard(sampler: Sampler[int], dataset: Dataset, seed: int) -> Sampler[int]:
    """This rank's replacement for a single-process training sampler (the sampler itself without DDP).

    Plain shuffling becomes a ``DistributedSampler``, weighted sampling MONAI's
    ``DistributedWeightedRandomSampler`` (each rank draws with replacement from its share, with the
    same per-case weights) and oversampling a shuffled share of each epoch's repeated indices. Each
    rank gets ``len(sampler) / world_size`` items per epoch; call ``set_epoch`` every epoch.
    """
    if not is_distributed():
        return sampler
    if isinstance(sampler, WeightedRandomSampler):
        return DistributedWeightedRandomSampler(dataset, sampler.weights.tolist(), seed=seed)
    if isinstance(sampler, OversampleSampler):
        return _OversampleShard(sampler, seed)
    if isinstance(sampler, RandomSampler):
        return DistributedSampler(dataset, shuffle=True, seed=seed)
    raise ValueError(
        f"{type(sampler).__name__} has no distributed form; under torchrun balance with "
        "none, weighted_sampler, oversample_augment, class_weighted_loss or focal"
    )


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Reseed the loader's distributed sampler for this epoch (a no-op for other samplers)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def from_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank."""
    if not is_distributed():
        return fn()
    box = [fn() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def mean(value: float) -> float:
    """The mean of a number over the ranks."""
    return sum(gather(float(value))) / world_size()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()
