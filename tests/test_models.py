"""Models: output shapes, gradients reaching every parameter, and learning a separable toy set."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from pipeline.augment import volume_to_slab_views
from pipeline.config import ClassifyConfig, ModelName, load_config
from pipeline.models import MODELS, ConvLSTMCell, build_model, ignored_settings, model_spec
from pipeline.models.cnn_lstm import GlobalPool

CASES = [
    ("cnn_lstm", {}, (4, 3, 5, 16, 16)),
    ("cnn_lstm", {"rnn": "gru", "bidirectional": False}, (4, 3, 1, 16, 16)),
    ("cnn_lstm", {"encoder": "resnet", "features": 8}, (4, 3, 3, 16, 16)),
    ("cnn_lstm", {}, (4, 1, 2, 16, 16)),  # a 2D input: the axial view only
    ("conv_lstm", {}, (4, 3, 3, 16, 16)),
    ("cnn3d", {}, (4, 1, 16, 16, 16)),
    ("cnn_lstm", {"pool": "avgmax"}, (4, 3, 3, 16, 16)),
    ("cnn3d", {"pool": "max"}, (4, 1, 16, 16, 16)),
    ("cnn_lstm", {"stem_stride": 2}, (4, 3, 6, 16, 16)),
    ("cnn3d_views", {"stem_stride": 2}, (4, 3, 32, 16, 16)),  # two slabs of every slice of 16³
]


def _model(name: str, options: dict, shape: tuple[int, ...]) -> nn.Module:
    cfg = ClassifyConfig(model=name, **{"features": 8, "depth": 2, "hidden": 16, **options})
    return build_model(
        cfg, in_channels=shape[2] if MODELS[name].input == "views" else shape[1], num_classes=3
    )


@pytest.mark.parametrize(("name", "options", "shape"), CASES)
def test_shape_and_gradients(name, options, shape):
    torch.manual_seed(0)
    model = _model(name, options, shape)
    logits = model(torch.randn(shape))
    assert logits.shape == (shape[0], 3)
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if len(shape) == 5 and shape[1] == 1 and not name.startswith("cnn3d"):
        # one step from a zero state: the recurrent weights cannot get a gradient
        missing = [n for n in missing if "weight_hh" not in n]
    assert not missing


def test_views_are_encoded_by_one_shared_encoder():
    cfg = ClassifyConfig(features=8, depth=2, hidden=16)
    model = build_model(cfg, in_channels=1, num_classes=2)
    n_encoder = sum(p.numel() for p in model.encoder.parameters())
    assert n_encoder == sum(p.numel() for p in build_model(cfg, 1, 2).encoder.parameters())
    x = torch.randn(2, 3, 1, 16, 16)
    model.eval()
    swapped = model(x[:, [2, 1, 0]])
    assert not torch.allclose(model(x), swapped)  # the LSTM sees the view order


def test_a_misspelt_model_is_refused_with_the_config(tmp_path):
    assert set(get_args(ModelName)) == set(MODELS)  # the config names every registered model
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("classify: {model: cnnlstm}\n")
    with pytest.raises(
        ValueError, match=r"cfg.yaml: classify.model: Input should be 'cnn_lstm'.*got 'cnnlstm'"
    ):
        load_config(cfg)
    cfg.write_text("classify: {device: gpu}\n")
    with pytest.raises(ValueError, match=r"cfg.yaml: classify.device: String should match"):
        load_config(cfg)
    with pytest.raises(ValueError, match="known: cnn3d, cnn3d_views, cnn_lstm, conv_lstm"):
        model_spec("resnet")


def test_model_keys_a_model_does_not_read_are_named():
    cfg = ClassifyConfig(
        model="conv_lstm",
        rnn="gru",
        hidden=32,
        folds=2,
        extra_models=[{"model": "cnn3d_views", "stem_stride": 2, "bidirectional": False}],
    )
    assert ignored_settings(cfg) == {"conv_lstm": ["rnn"], "cnn3d_views": ["bidirectional"]}
    assert ignored_settings(ClassifyConfig(rnn="gru", pool="avgmax")) == {}
    inherited = ClassifyConfig(model="cnn3d", hidden=32, folds=2, extra_models=[{"model": "cnn_lstm"}])
    assert ignored_settings(inherited) == {}  # the extra CNN-LSTM takes hidden from the base settings


def test_conv_lstm_cell_state():
    cell = ConvLSTMCell(2, 4)
    h, c = cell(torch.randn(1, 2, 6, 6))
    assert h.shape == c.shape == (1, 4, 6, 6) and h.abs().max() < 1


def _separable(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 has a bright blob in the centre of every view (or of the volume)."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(8) % 2
    spec = MODELS[name]
    shape = (8, 3, 8 if spec.whole_volume else 1, 8, 8) if spec.input == "views" else (8, 1, 8, 8, 8)
    x = 0.1 * torch.randn(shape, generator=g)
    x[y == 1, ..., 2:6, 2:6] += 1.0
    return x, y


@pytest.mark.parametrize("name", sorted(MODELS))
def test_overfits_tiny_separable_set(name):
    torch.manual_seed(0)
    x, y = _separable(name)
    model = _model(name, {"dropout": 0.0, "features": 4}, x.shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    assert (model(x).argmax(1) == y).all()


def test_3d_cnn_on_slab_views_sees_the_volume_behind_them():
    """Same weights: the 3D CNN on a volume's whole-volume slab views equals it on the volume."""
    torch.manual_seed(0)
    cfg = ClassifyConfig(model="cnn3d", features=4, depth=2, pool="avgmax")
    on_volume = build_model(cfg, 1, 2).eval()
    on_views = build_model(cfg.model_copy(update={"model": "cnn3d_views"}), 999, 2).eval()
    on_views.load_state_dict(on_volume.state_dict())
    volume = torch.rand(2, 10, 10, 10)  # two cases; asymmetric, so a flipped or transposed axis shows
    distance = torch.rand(2, 10, 10, 10)  # a second slab block, which the 3D CNN ignores
    views = torch.stack(
        [volume_to_slab_views(torch.stack([v, d])) for v, d in zip(volume, distance, strict=True)]
    )
    assert views.shape == (2, 3, 20, 10, 10)
    assert torch.allclose(on_views(views), on_volume(volume[:, None]), atol=1e-6)
    with pytest.raises(ValueError, match="whole-volume slab views"):
        on_views(views[:, :, :7])


def test_global_pool_modes_on_a_hand_made_map():
    """One hot spot in a 4x4 map: the mean dilutes it 16-fold, the max keeps it."""
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 1, 2] = 8.0
    x[0, 1] = 1.0
    assert GlobalPool("avg")(x).tolist() == [[0.5, 1.0]]
    assert GlobalPool("max")(x).tolist() == [[8.0, 1.0]]
    assert GlobalPool("avgmax")(x).tolist() == [[0.5, 1.0, 8.0, 1.0]]


def test_stem_stride_halves_the_encoder_grid():
    encoder = build_model(ClassifyConfig(features=8, depth=2, stem_stride=2), 3, 2).encoder
    first = encoder.layers[0]
    assert first.conv.stride == (2, 2)
    assert encoder.layers[:-1](torch.zeros(1, 3, 32, 32)).shape == (1, 16, 8, 8)  # 32 -> 16 (stem) -> 8
