"""Checkpoints: round trip with sidecar, and refusal of a pickle that would run code."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, load_state, save_checkpoint, sidecar_path


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    meta = {"classes": ["normal", "mass"], "preprocess": {"shape": [28, 28, 28]}}
    path = save_checkpoint(tmp_path / "checkpoint.pt", model, meta)
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["classes"] == ["normal", "mass"] and sidecar["versions"]["torch"] == torch.__version__
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    state, loaded_meta = load_checkpoint(path, fresh)
    assert loaded_meta["preprocess"] == {"shape": [28, 28, 28]}
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value) and torch.equal(state[key], value)


def test_weights_that_do_not_fit_the_model_are_named(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match=r"checkpoint.pt: its weights do not fit the model .*size mismatch"):
        load_checkpoint(path, nn.Linear(2, 3))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload(str(marker))}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_state(evil)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(evil, nn.Linear(2, 2))
    assert not marker.exists()
    # Control: the file's own pickle stream *does* run the payload when unpickled plainly, so the
    # refusal above is what kept it from running (the test can fail).
    with zipfile.ZipFile(evil) as archive:
        pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
    assert marker.exists()


def test_another_tasks_checkpoint_is_named_not_crashed_on(tmp_path):
    from pipeline.infer.segment import load_segmenter
    from pipeline.models.registry import load_classifier

    save_checkpoint(tmp_path / "classify" / "checkpoint.pt", nn.Linear(2, 2), {"task": "classify"})
    save_checkpoint(tmp_path / "segment" / "checkpoint.pt", nn.Linear(2, 2), {"task": "segment"})
    with pytest.raises(ValueError, match=r"classify/checkpoint.pt: a 'classify' checkpoint, not a segment"):
        load_segmenter(tmp_path / "classify")
    with pytest.raises(ValueError, match=r"segment/checkpoint.pt: a 'segment' checkpoint, not a classify"):
        load_classifier(tmp_path / "segment" / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no classify checkpoint"):
        load_classifier(tmp_path / "nothing" / "checkpoint.pt")
    with pytest.raises(
        FileNotFoundError, match=rf"{tmp_path}: a run folder; give --model {tmp_path / 'segment'}$"
    ):
        load_segmenter(tmp_path)  # the run folder instead of RUN/segment


def test_a_write_cut_short_by_a_full_disk_is_an_enospc_error(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from pipeline import checkpoint

    def cut_short(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", cut_short)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    with pytest.raises(OSError) as info:
        checkpoint.save_state(tmp_path / "last_state.pt", {"epoch": 1})
    assert info.value.errno == errno.ENOSPC and "last_state.pt" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no half-written file left
