"""The shared training loop: learning, best checkpoint, history, early stopping, exact resume."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.checkpoint import load_checkpoint, load_state, save_state
from pipeline.train.loop import LoopSettings, fit


def _data(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _accuracy(loader: DataLoader):
    def validate(model: nn.Module) -> dict[str, float]:
        model.eval()
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
        return {"acc": hits / len(loader.dataset), "neg_loss": 0.0}

    return validate


class Interrupted(Exception):
    pass


def _run(
    out,
    epochs: int,
    resume: bool = False,
    crash_after: int | None = None,
    ema: float | None = None,
    precision: str = "float32",
    invalidates=(),
):
    torch.manual_seed(123)  # model init; the loop seeds everything else itself
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    ds = _data()
    train = DataLoader(ds, batch_size=8, shuffle=True)
    accuracy, calls = _accuracy(DataLoader(ds, batch_size=64)), []

    def validate(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        if crash_after is not None and len(calls) > crash_after:
            raise Interrupted
        return accuracy(model)

    settings = LoopSettings(
        epochs=epochs, lr=0.05, monitor="acc", seed=7, progress=False, ema_decay=ema, precision=precision
    )
    result = fit(
        model,
        train,
        nn.CrossEntropyLoss(),
        validate,
        out,
        settings,
        meta={"classes": ["a", "b"]},
        resume=resume,
        invalidates=invalidates,
    )
    return model, result


def test_fit_learns_and_writes_outputs(tmp_path):
    model, result = _run(tmp_path, epochs=6)
    assert result.best_metric >= 0.9
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(6))
    assert {"train_loss", "val_acc", "val_neg_loss", "lr", "seconds"} <= set(rows[0])
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # cosine decays
    state, meta = load_checkpoint(result.checkpoint)
    assert meta["classes"] == ["a", "b"] and meta["epoch"] == result.best_epoch
    assert {"torch", "monai", "medpipe"} <= set(meta["versions"])
    for key, value in model.state_dict().items():  # the model holds the best weights on return
        assert torch.equal(value, state[key])
    assert any((tmp_path / "tb").iterdir())


def test_bfloat16_forward_learns_with_float32_weights(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(nn.Linear, "forward", _recording(nn.Linear.forward, seen))
    model, result = _run(tmp_path, epochs=6, precision="bfloat16")
    assert result.best_metric >= 0.9
    assert torch.bfloat16 in seen and torch.float32 in seen  # bf16 in training, fp32 in validation
    assert all(p.dtype == torch.float32 for p in model.parameters())


def _recording(forward, seen: list):
    def wrapped(self, x):
        out = forward(self, x)
        seen.append(out.dtype)
        return out

    return wrapped


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_matches_uninterrupted_run(tmp_path, ema):
    full_model, full = _run(tmp_path / "full", epochs=5, ema=ema)
    with pytest.raises(Interrupted):  # killed during the third epoch
        _run(tmp_path / "split", epochs=5, crash_after=2, ema=ema)
    split_model, split = _run(tmp_path / "split", epochs=5, resume=True, ema=ema)
    assert [r["train_loss"] for r in split.history] == pytest.approx([r["train_loss"] for r in full.history])
    assert split.best_epoch == full.best_epoch
    for key, value in full_model.state_dict().items():
        assert torch.allclose(value, split_model.state_dict()[key])


def test_resume_under_another_epoch_count_is_refused(tmp_path):
    with pytest.raises(Interrupted):
        _run(tmp_path, epochs=5, crash_after=2)
    before = (tmp_path / "last_state.pt").read_bytes()
    with pytest.raises(ValueError, match=r"last_state\.pt: .*spans 5 epochs.*--epochs 5"):
        _run(tmp_path, epochs=8, resume=True)
    assert (tmp_path / "last_state.pt").read_bytes() == before  # the interrupted run is intact
    _, result = _run(tmp_path, epochs=5, resume=True)
    assert result.epochs_run == 5


def test_resuming_on_another_number_of_processes_is_warned_about(tmp_path, capsys):
    with pytest.raises(Interrupted):
        _run(tmp_path, epochs=4, crash_after=2)
    state = load_state(tmp_path / "last_state.pt")
    save_state(tmp_path / "last_state.pt", {**state, "rank_rng": state["rank_rng"] * 2})  # as 2 ranks save it
    _, result = _run(tmp_path, epochs=4, resume=True)
    assert result.epochs_run == 4
    assert "a run of 2 process(es) resumed on 1" in capsys.readouterr().err


def test_a_fresh_start_leaves_nothing_of_an_earlier_run(tmp_path):
    """A new run killed in its first epoch leaves no earlier run's state to be resumed, history to
    be read or TensorBoard events to be drawn over its own."""
    _run(tmp_path, epochs=3)
    with pytest.raises(Interrupted):
        _run(tmp_path, epochs=5, crash_after=0)
    for name in ("last_state.pt", "history.csv", "checkpoint.pt", "checkpoint.json"):
        assert not (tmp_path / name).exists(), name
    assert len(list((tmp_path / "tb").iterdir())) == 1  # the new run's own event file


def test_invalidated_files_go_only_when_an_epoch_runs(tmp_path, capsys):
    evaluation = tmp_path / "metrics.json"
    _run(tmp_path, epochs=2)
    evaluation.write_text("{}")
    _run(tmp_path, epochs=2, resume=True, invalidates=[evaluation])  # finished: nothing retrains
    assert evaluation.is_file()
    assert "training finished at epoch 2" in capsys.readouterr().err
    _run(tmp_path, epochs=2, invalidates=[evaluation])
    assert not evaluation.exists()


def test_a_loader_without_a_batch_is_an_error(tmp_path):
    empty = DataLoader(_data(), batch_size=100, drop_last=True)  # 64 cases: no whole batch
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="gave no batch"):
        fit(model, empty, nn.CrossEntropyLoss(), _accuracy(empty), tmp_path, LoopSettings(progress=False))


def test_early_stopping(tmp_path):
    def constant(model: nn.Module) -> dict[str, float]:
        return {"acc": 0.5}

    model = nn.Linear(4, 2)
    train = DataLoader(_data(), batch_size=16)
    settings = LoopSettings(epochs=20, monitor="acc", patience=3, progress=False)
    result = fit(model, train, nn.CrossEntropyLoss(), constant, tmp_path, settings)
    assert result.best_epoch == 0 and result.epochs_run == 4


def test_missing_monitor_is_an_error(tmp_path):
    settings = LoopSettings(epochs=1, monitor="auc", progress=False)
    with pytest.raises(KeyError, match="auc"):
        fit(
            nn.Linear(4, 2),
            DataLoader(_data(), batch_size=16),
            nn.CrossEntropyLoss(),
            lambda m: {"acc": 1.0},
            tmp_path,
            settings,
        )


def test_ema_weights_are_validated_and_saved(tmp_path):
    plain, _ = _run(tmp_path / "plain", epochs=3)
    _, result = _run(tmp_path / "ema", epochs=3, ema=0.9)
    state, _ = load_checkpoint(result.checkpoint)
    assert state.keys() == plain.state_dict().keys()
    assert not torch.allclose(state["0.weight"], plain.state_dict()["0.weight"])


@pytest.mark.parametrize(
    ("scores", "best_epoch"),
    [([float("nan")] * 3, 2), ([float("nan"), float("nan"), 0.6, float("nan"), 0.5], 2)],
)
def test_undefined_score_keeps_the_latest_epoch_until_a_defined_one(tmp_path, scores, best_epoch):
    values = iter(scores)  # AUC on a one-class val split is NaN

    def validate(model: nn.Module) -> dict[str, float]:
        return {"auc": next(values)}

    settings = LoopSettings(epochs=len(scores), monitor="auc", progress=False)
    train = DataLoader(_data(), batch_size=16)
    result = fit(nn.Linear(4, 2), train, nn.CrossEntropyLoss(), validate, tmp_path, settings)
    assert result.best_epoch == best_epoch
    assert load_checkpoint(result.checkpoint)[1]["epoch"] == best_epoch
