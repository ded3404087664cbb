"""Classifiers: the multi-view CNN-LSTM, its ConvLSTM variant, a 3D CNN baseline (on the volume or
on the volume behind whole-volume slab views), a probability-averaging ensemble, and their registry."""

from pipeline.models.cnn3d import SlabVolume3DCNN, Small3DCNN
from pipeline.models.cnn_lstm import MultiViewCNNLSTM
from pipeline.models.conv_lstm import ConvLSTMCell, MultiViewConvLSTM
from pipeline.models.ensemble import Ensemble
from pipeline.models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    ignored_settings,
    load_classifier,
    model_spec,
)

__all__ = [
    "MODELS",
    "ConvLSTMCell",
    "Ensemble",
    "ModelSpec",
    "MultiViewCNNLSTM",
    "MultiViewConvLSTM",
    "SlabVolume3DCNN",
    "Small3DCNN",
    "build_model",
    "ignored_settings",
    "load_classifier",
    "model_spec",
]
