"""Safe checkpoints: a ``state_dict`` in a ``.pt`` file plus a JSON sidecar, loaded without unpickling.

``save_checkpoint`` writes ``NAME.pt`` (tensors only) and ``NAME.json`` (whatever metadata the caller
gives, such as the config, class names and preprocessing parameters, plus the torch/monai/medpipe
versions). ``load_checkpoint`` reads the weights with ``torch.load(..., weights_only=True)``, which
refuses any pickled object that is not a plain container of tensors and numbers, so a crafted file
cannot run code. ``save_state``/``load_state`` do the same for the training loop's resume state.

Example:
    >>> path = save_checkpoint(tmp / "checkpoint.pt", model, {"classes": ["no", "yes"]})  # doctest: +SKIP
    >>> state, meta = load_checkpoint(path, model)                                       # doctest: +SKIP
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import __version__
from pipeline.io import atomic_path

__all__ = [
    "load_checkpoint",
    "load_state",
    "read_task_sidecar",
    "save_checkpoint",
    "save_state",
    "sidecar_path",
    "versions",
]


LOW_SPACE = 64 * 2**20  # bytes free below which a failed write is taken for a full disk


def versions() -> dict[str, str]:
    """Versions of the libraries a checkpoint depends on."""
    import monai

    return {"torch": torch.__version__, "monai": monai.__version__, "medpipe": __version__}


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar next to a ``.pt`` file."""
    return Path(path).with_suffix(".json")


def read_task_sidecar(path: str | Path, task: str) -> dict[str, Any]:
    """The sidecar of a ``task`` checkpoint; a clear error when the checkpoint is missing or is
    another task's (``--model RUN/classify`` given to ``predict segment``)."""
    path = Path(path)
    if not path.is_file() or not sidecar_path(path).is_file():
        inside = path.parent / task / path.name  # --model RUN instead of RUN/<task>
        if inside.is_file():
            raise FileNotFoundError(f"{path.parent}: a run folder; give --model {path.parent / task}")
        raise FileNotFoundError(f"{path}: no {task} checkpoint (run `medpipe train {task}` first)")
    meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    if meta.get("task") != task:
        raise ValueError(f"{path}: a {meta.get('task', 'unknown')!r} checkpoint, not a {task} one")
    return meta


def save_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a mapping of tensors, numbers, strings and containers of them atomically. A write that
    a full disk cut short is an ENOSPC OSError (torch reports it as an opaque RuntimeError)."""
    with atomic_path(path) as tmp:
        try:
            torch.save(dict(state), tmp)
        except RuntimeError as exc:
            if shutil.disk_usage(tmp.parent).free < LOW_SPACE:
                raise OSError(errno.ENOSPC, f"No space left on device writing {path} ({exc})") from exc
            raise
    return Path(path)


def load_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by ``save_state``; pickled code objects are refused (``weights_only``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(
    path: str | Path, model: nn.Module | Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> Path:
    """Write ``path`` (the state_dict) and its JSON sidecar (``meta`` plus library versions)."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    save_state(path, state)
    sidecar = {**meta, "versions": versions(), "weights": Path(path).name}
    with atomic_path(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2, default=str), encoding="utf-8")
    return Path(path)


def load_checkpoint(
    path: str | Path, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read (state_dict, meta); if ``model`` is given, load the weights into it (strictly)."""
    state = load_state(path, map_location)
    sidecar = sidecar_path(path)
    meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    if model is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # e.g. a sidecar edited or copied from another checkpoint
            detail = " ".join(str(exc).split())[:300]
            raise ValueError(
                f"{path}: its weights do not fit the model its sidecar describes: {detail}"
            ) from None
    return state, meta
