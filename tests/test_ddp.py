"""torch DDP training under ``torchrun`` on 2 CPU processes (gloo), compared with one process.

The lung U-Net (instance norm, no dropout) trains full-batch with augmentation off: one optimiser
step per epoch over all training slices. One process uses ``batch_size`` 2B; two ranks use B each,
the same global batch. DDP averages the two ranks' gradients of their mean losses, which equals
the gradient of the mean over the global batch (the ranks hold equally many slices), so both runs
take the same steps up to floating-point summation order. Tolerances: 1e-4 relative on every
epoch's train loss, 2e-3 absolute on the validation Dice (a threshold at 0 may flip a pixel) and
1e-4 on the class probabilities the two checkpoints give a fixed random input. Measured on this
machine: train loss 1.1e-7 relative, Dice identical, probabilities 7.7e-7. The weights are not
compared: the conv biases in front of an instance norm, and the common shift of the two output
logits, get a true gradient of 0, so Adam turns rounding noise into steps of about ``lr`` that
differ between the runs (up to 1.7e-3 here) but cancel in the output.

The classifier, by contrast, has BatchNorm, whose batch statistics are per rank on CPU
(SyncBatchNorm needs a GPU), and balances by random weighted draws per rank, so its runs differ by
more than rounding: its 2-rank run is checked to finish with rank-0-only outputs, and the sampler
mapping is checked in one process.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from monai.data import DistributedSampler, DistributedWeightedRandomSampler

from pipeline.balance import balance
from pipeline.checkpoint import load_state
from pipeline.config import load_config
from pipeline.models.lung_unet import build_lung_unet
from pipeline.synth import write_cohort
from pipeline.train import distributed
from pipeline.train.segment import run_train_segment

SLICES_PER_CASE = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TORCHRUN_ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _torchrun_command(nproc: int, *args: str) -> list[str]:
    """``torchrun --nproc_per_node=nproc -m pipeline -- ARGS`` on 127.0.0.1 only.

    The ``--`` stops torchrun's own parser, which would take ``--run`` for an ambiguous
    abbreviation of its ``--run-path``.
    """
    torchrun = Path(sys.executable).with_name("torchrun")
    return [
        str(torchrun),
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "pipeline",
        "--",
        *args,
    ]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _torchrun_command(nproc, *args), capture_output=True, text=True, env=TORCHRUN_ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"), 8, 0.25, size=48, depth=16, seed=2)


def _segment_config(tmp_path: Path, manifest: Path, batch_size: int) -> Path:
    config = {
        "data": {"manifest": str(manifest), "val_fraction": 0.15, "test_fraction": 0.0},
        "segment": {
            "epochs": 3,
            "batch_size": batch_size,
            "size": 32,
            "channels": [4, 8, 16],
            "num_res_units": 1,
            "augment": False,
            "slices_per_volume": SLICES_PER_CASE,
            "patience": None,
            "precision": "float32",  # compared to rounding: bfloat16 kernels round by batch shape
        },
    }
    path = tmp_path / f"segment_b{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_rank_segment_training_matches_one_process_at_the_same_global_batch(cohort, tmp_path):
    torch.set_num_threads(1)
    probe = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    n_train = SLICES_PER_CASE * 7  # 8 cases: 7 train, 1 val
    single = load_config(_segment_config(tmp_path, cohort, n_train), run=tmp_path / "single")
    one = run_train_segment(single)
    config = _segment_config(tmp_path, cohort, n_train // 2)
    _torchrun(2, "train", "segment", "--run", str(tmp_path / "ddp"), "--config", str(config))
    two = tmp_path / "ddp" / "segment"

    assert sum(1 for row in csv.reader((one / "splits.csv").open()) if row[1] == "train") == 7
    h1, h2 = _history(one / "history.csv"), _history(two / "history.csv")
    assert [r["epoch"] for r in h2] == [0, 1, 2]  # one row per epoch: rank 0 alone wrote it
    for r1, r2 in zip(h1, h2, strict=True):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-4)
        assert r2["val_dice"] == pytest.approx(r1["val_dice"], abs=2e-3)
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]  # it trains, so a wrong step would show
    probabilities = []
    for out in (one, two):
        net = build_lung_unet((4, 8, 16), num_res_units=1)
        net.load_state_dict(load_state(out / "checkpoint.pt"))
        with torch.no_grad():
            probabilities.append(torch.softmax(net.eval()(probe), 1))
    assert float((probabilities[0] - probabilities[1]).abs().max()) < 1e-4
    assert len(list((two / "tb").glob("events.*"))) == 1


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == pid]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's closing parenthesis: state, ppid, ..."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    return int(fields[1]) if (fields := _stat(pid)) else None


def _running(pid: int) -> bool:
    return bool(fields := _stat(pid)) and fields[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_the_ranks_end_with_a_launcher_killed_outright(cohort, tmp_path):
    """kill -9 of torchrun cannot pass the signal on; the ranks must not train on unseen."""
    config = _segment_config(tmp_path, cohort, 4)
    config.write_text(config.read_text().replace("epochs: 3", "epochs: 1000"))
    run = tmp_path / "ddp"
    command = _torchrun_command(2, "train", "segment", "--run", str(run), "--config", str(config))
    launcher = subprocess.Popen(
        command, env=TORCHRUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "segment" / "history.csv").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2 and (run / "segment" / "history.csv").is_file()
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while any(_running(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in ranks)
    finally:
        launcher.kill()
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_two_rank_classifier_training_finishes_and_only_rank_0_writes(cohort, tmp_path):
    """Preprocess, then train the classifier on 2 ranks with ``weighted_sampler`` for 2 epochs.

    The one validation case makes AUC undefined, so the monitored metric is accuracy.
    """
    run = tmp_path / "run"
    config = tmp_path / "classify.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"manifest": str(cohort)},
                "preprocess": {"shape": [16, 16, 16], "spacing": [16.0] * 3},
                "classify": {
                    "epochs": 2,
                    "batch_size": 2,
                    "features": 2,
                    "depth": 1,
                    "hidden": 4,
                    "balance": "weighted_sampler",
                    "monitor": "accuracy",
                },
            }
        )
    )
    from pipeline.preprocess.stage import run_preprocess

    run_preprocess(load_config(config, run=run))
    _torchrun(2, "train", "classify", "--run", str(run), "--config", str(config))
    out = run / "classify"
    assert [r["epoch"] for r in _history(out / "history.csv")] == [0, 1]
    assert len(list((out / "tb").glob("events.*"))) == 1
    state = load_state(out / "last_state.pt")
    assert len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])
    assert (out / "checkpoint.pt").is_file() and (out / "balance.json").is_file()


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank on 127.0.0.1, so the distributed samplers can be built."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_shard_maps_each_balancing_sampler_to_its_distributed_form(one_rank_group):
    labels = np.array([0] * 9 + [1] * 3)
    dataset = list(range(len(labels)))
    weighted = distributed.shard(balance("weighted_sampler", labels, 2).sampler, dataset, seed=0)
    assert isinstance(weighted, DistributedWeightedRandomSampler)
    assert torch.allclose(
        torch.as_tensor(weighted.weights, dtype=torch.float32), torch.tensor([2 / 3] * 9 + [2.0] * 3)
    )
    assert type(distributed.shard(balance("none", labels, 2).sampler, dataset, 0)) is DistributedSampler
    uneven = np.array([0] * 10 + [1] * 3)  # 7 repeats of 3 cases
    shard = distributed.shard(balance("oversample_augment", uneven, 2).sampler, list(range(13)), seed=0)
    drawn = []
    for epoch in range(4):
        shard.set_epoch(epoch)
        drawn.append(sorted(shard))
        assert np.bincount(uneven[drawn[-1]]).tolist() == [10, 10] and set(drawn[-1]) == set(range(13))
    shard.set_epoch(0)
    assert sorted(shard) == drawn[0]  # an epoch's repeats are the same on every rank
    assert len({tuple(d) for d in drawn}) > 1  # and change from epoch to epoch
    with pytest.raises(ValueError, match="no distributed form"):
        distributed.shard(balance("undersample", labels, 2).sampler, dataset, 0)
