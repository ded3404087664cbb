"""One registry: a config model name → its constructor and the cache array it reads.

Example:
    >>> from pipeline.config import ClassifyConfig
    >>> model = build_model(ClassifyConfig(model="cnn3d"), in_channels=1, num_classes=2)
    >>> MODELS["cnn3d"].input
    'volume'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from pipeline.config import ClassifyConfig
from pipeline.models.cnn3d import SlabVolume3DCNN, Small3DCNN
from pipeline.models.cnn_lstm import MultiViewCNNLSTM
from pipeline.models.conv_lstm import MultiViewConvLSTM
from pipeline.models.ensemble import Ensemble

__all__ = ["MODELS", "ModelSpec", "build_model", "ignored_settings", "load_classifier", "model_spec"]

# the classify keys that shape a model; each model reads some of them (ModelSpec.reads)
ARCHITECTURE = (
    "encoder",
    "features",
    "depth",
    "rnn",
    "hidden",
    "pool",
    "stem_stride",
    "bidirectional",
    "dropout",
)
_CNN3D_KEYS = frozenset({"features", "depth", "dropout", "pool", "stem_stride"})


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model (in_channels, num_classes, config) and which cache array it takes."""

    build: Callable[[int, int, ClassifyConfig], nn.Module]
    input: Literal["views", "volume"]
    reads: frozenset[str]  # the ARCHITECTURE keys the model is built from
    whole_volume: bool = False  # views must hold every slice of a cube (pipeline.augment.whole_volume_slabs)


MODELS: dict[str, ModelSpec] = {
    "cnn_lstm": ModelSpec(
        lambda c, n, cfg: MultiViewCNNLSTM(
            c,
            n,
            cfg.features,
            cfg.depth,
            cfg.encoder,
            cfg.rnn,
            cfg.hidden,
            cfg.bidirectional,
            cfg.dropout,
            cfg.pool,
            cfg.stem_stride,
        ),
        "views",
        frozenset(ARCHITECTURE),
    ),
    "conv_lstm": ModelSpec(
        lambda c, n, cfg: MultiViewConvLSTM(c, n, cfg.features, cfg.depth, cfg.hidden, cfg.dropout),
        "views",
        frozenset({"features", "depth", "hidden", "dropout"}),
    ),
    "cnn3d": ModelSpec(
        lambda c, n, cfg: Small3DCNN(c, n, cfg.features, cfg.depth, cfg.dropout, cfg.pool, cfg.stem_stride),
        "volume",
        _CNN3D_KEYS,
    ),
    "cnn3d_views": ModelSpec(
        lambda c, n, cfg: SlabVolume3DCNN(
            1, n, cfg.features, cfg.depth, cfg.dropout, cfg.pool, cfg.stem_stride
        ),
        "views",
        _CNN3D_KEYS,
        whole_volume=True,
    ),
}


def model_spec(name: str) -> ModelSpec:
    """The registry entry for a model name; an unknown name is an error listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown classify.model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def ignored_settings(cfg: ClassifyConfig) -> dict[str, list[str]]:
    """Per model of ``cfg``, the model keys it was given but does not read: for ``cfg.model`` those
    set away from their defaults that no extra model inherits, for each of ``extra_models`` those its
    overrides name."""
    defaults = ClassifyConfig()
    inherited = {  # a key set for cfg.model that an extra model takes over without overriding it
        key for extra in cfg.extra_models for key in model_spec(str(extra["model"])).reads if key not in extra
    }
    given = [
        (
            cfg.model,
            [
                key
                for key in ARCHITECTURE
                if getattr(cfg, key) != getattr(defaults, key) and key not in inherited
            ],
        ),
        *((str(extra["model"]), [key for key in ARCHITECTURE if key in extra]) for extra in cfg.extra_models),
    ]
    ignored = {}
    for name, keys in given:
        if unread := [key for key in keys if key not in model_spec(name).reads]:
            ignored[name] = unread
    return ignored


def build_model(cfg: ClassifyConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The model ``cfg.model`` names, for inputs with ``in_channels`` channels."""
    return model_spec(cfg.model).build(in_channels, num_classes, cfg)


def load_classifier(checkpoint: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained classifier (or fold ensemble) from its checkpoint and sidecar.

    Returns (model in eval mode, meta).
    """
    from pipeline.checkpoint import load_checkpoint, read_task_sidecar

    meta = read_task_sidecar(checkpoint, "classify")
    cfg = ClassifyConfig.model_validate(meta["classify"])
    members = [
        build_model(model_cfg, int(meta["in_channels"]), max(len(meta["classes"]), 2))
        for model_cfg in cfg.fold_models()
        for _ in range(int(meta.get("folds", 1)))
    ]
    model = members[0] if len(members) == 1 else Ensemble(members)
    load_checkpoint(checkpoint, model, map_location=device)
    return model.to(device).eval(), meta
