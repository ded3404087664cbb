"""The experiment configuration: pydantic models of the YAML file.

Every stage takes a ``Config``. Unknown keys are refused (a typo in a YAML key is an error, not a
silent default). The resolved config is saved in the run folder by each stage.

Example:
    >>> cfg = Config.model_validate({"name": "demo", "preprocess": {"shape": [64, 64, 64]}})
    >>> cfg.preprocess.shape
    (64, 64, 64)
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ClassifyConfig",
    "Config",
    "DataConfig",
    "IOConfig",
    "IntensityConfig",
    "ModelName",
    "Precision",
    "PredictConfig",
    "PreprocessConfig",
    "SegmentConfig",
    "ViewsConfig",
    "config_yaml",
    "load_config",
    "save_config",
]

# the classifiers of pipeline.models.registry.MODELS (each reads only some of the model keys below)
ModelName = Literal["cnn_lstm", "conv_lstm", "cnn3d", "cnn3d_views"]

# a net's numeric precision (pipeline.train.precision): "auto" is bfloat16 where oneDNN supports it
Precision = Literal["auto", "float32", "bfloat16"]


class Section(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class IOConfig(Section):
    """Header checks and read options (see ``pipeline.io.read_volume``)."""

    max_voxels: int = Field(1_000_000_000, gt=0)
    allow_2d: bool = False
    volume_index: int | None = None
    nonfinite: Literal["error", "zero"] = "error"


class DataConfig(Section):
    """Where the cases come from and how they are split."""

    manifest: Path | None = None
    input: Path | None = None
    classes: list[str] | None = None
    allow_outside_paths: bool = False
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 0


class IntensityConfig(Section):
    """Intensity handling: CT window, MR percentile + z-score, min-max, or none; then optional smoothing."""

    mode: Literal["ct", "mr", "minmax", "none"] = "ct"
    window: tuple[float, float] = (-1024.0, 600.0)
    percentiles: tuple[float, float] = (0.5, 99.5)
    # Gaussian sigma in mm applied after normalising (0: off). For binary shape masks a soft edge
    # lets the CNN see sub-voxel shape, such as a gland's thickness, that a 0/1 staircase hides.
    smooth_mm: float = Field(0.0, ge=0)


class ViewsConfig(Section):
    """Which three orthogonal views are cut, and how (see ``pipeline.preprocess.views``)."""

    center: Literal["volume", "mask", "point"] = "volume"
    point: tuple[float, float, float] | None = None  # RAS mm, with center: point
    mode: Literal["slice", "slab", "mean", "max", "projections"] = "slice"
    thickness: int = Field(1, ge=1)
    # Cut the views with everything outside the case's mask set to background: with mode max this
    # is a lung-only MIP, where a nodule stands out that a whole-chest projection hides.
    within_mask: bool = False
    # With within_mask: also drop the mask's outer layer, every voxel within this many mm of a voxel
    # outside it. Resampled edge voxels mix lung with chest wall, and a lung-only MIP shows that
    # partial-volume rim as a bright outline around each lung.
    mask_margin_mm: float = Field(0.0, ge=0)
    # For binary shape masks (intensity mode minmax; the shape is where the scaled image is >= 0.5):
    # also cut each view from the shape's distance map (each voxel's distance to the surface in mm / 10,
    # pipeline.preprocess.intensity.surface_distance), as a second slab of the same slices after the
    # image's. A gland's thickness becomes a value the CNN reads, instead of a width it must measure.
    distance: bool = False

    @property
    def blocks(self) -> int:
        """How many slabs of the same slices each view's channels hold (image, then distance)."""
        return 2 if self.distance else 1

    @model_validator(mode="after")
    def _point_given(self) -> ViewsConfig:
        if self.center == "point" and self.point is None:
            raise ValueError("views.center 'point' needs views.point (RAS mm)")
        return self


class PreprocessConfig(Section):
    """Spatial and intensity preprocessing into a cube, plus the views cut from it."""

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 1.5)
    shape: tuple[int, int, int] = (128, 128, 128)
    fit: Literal["resize", "pad"] = "resize"
    crop_foreground: bool = True
    foreground_threshold: float | None = None
    margin_mm: float = Field(5.0, ge=0)
    intensity: IntensityConfig = IntensityConfig()
    views: ViewsConfig = ViewsConfig()
    # Also cache the whole preprocessed volume (float16), which only the 3D CNN baseline reads.
    cache_volume: bool = False
    workers: int = Field(0, ge=0)
    scheduler: str | None = None  # a Dask scheduler address, e.g. tcp://host:8786

    @model_validator(mode="after")
    def _distance_of_a_shape(self) -> PreprocessConfig:
        if self.views.distance and self.intensity.mode != "minmax":
            raise ValueError("views.distance is for binary shape masks: it needs intensity.mode minmax")
        return self


class ClassifyConfig(Section):
    """Classifier training (owned by the classifier stage)."""

    model: ModelName = "cnn_lstm"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    # 1: one model, its best epoch chosen on the val split. K > 1: a cross-validation ensemble of K
    # models, one per stratified, patient-grouped fold of the train split, each keeping its best epoch
    # on its held-out fold; their mean probability is the prediction (pipeline.train.classify).
    folds: int = Field(1, ge=1)
    fold_workers: int = Field(1, ge=1)  # folds trained at once, in local processes (not under torchrun)
    # with folds > 1: more models trained on every fold beside ``model``, each given as overrides of
    # this section (e.g. {model: cnn3d_views, stem_stride: 2}) and taking the same input; the ensemble
    # averages every fold's member of every model
    extra_models: list[dict[str, Any]] = []
    # model
    encoder: Literal["conv", "resnet"] = "conv"
    features: int = Field(16, ge=1)
    depth: int = Field(3, ge=1)
    rnn: Literal["lstm", "gru"] = "lstm"
    hidden: int = Field(64, ge=1)
    pool: Literal["avg", "max", "avgmax"] = "avg"  # how the conv encoder pools a view (or volume)
    stem_stride: int = Field(1, ge=1, le=4)  # stride of the conv encoder's first convolution
    bidirectional: bool = True
    dropout: float = Field(0.3, ge=0, lt=1)
    # optimisation (pipeline.train.loop)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    patience: int | None = Field(10, ge=1)
    monitor: Literal["auc", "balanced_accuracy", "accuracy"] = "auc"
    ema_decay: float | None = Field(None, gt=0, lt=1)  # validate/save an EMA of the weights
    train_precision: Precision = "float32"  # of the training forward pass; predictions are float32
    # class balancing (pipeline.balance) and augmentation (pipeline.augment)
    balance: Literal[
        "none", "weighted_sampler", "oversample_augment", "undersample", "class_weighted_loss", "focal"
    ] = "weighted_sampler"
    oversample_ratio: float = Field(1.0, gt=0, le=1)  # minority / majority after oversampling
    undersample_ratio: float = Field(1.0, ge=1)  # majority / minority kept per epoch
    focal_gamma: float = Field(2.0, ge=0)
    augment: bool = True
    flip_axes: tuple[int, ...] = (0,)  # volume axes (RAS i, j, k) flipped at random; 0 = left-right
    affine_prob: float = Field(0.3, ge=0, le=1)
    rotate_degrees: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0)
    # view: a 2D rotation/scaling per view; volume: one 3D affine of the volume, its views recut
    # (whole-volume slab views only, pipeline.augment.SlabVolumeAffine)
    affine_space: Literal["view", "volume"] = "view"
    intensity_prob: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0)
    # evaluation
    threshold: Literal["youden", "balanced_accuracy"] = "youden"
    # the cases the threshold is chosen on: the val split, plus (with folds > 1) the out-of-fold
    # scores of every training case
    threshold_on: Literal["val", "val+oof"] = "val+oof"
    n_boot: int = Field(1000, ge=0)
    workers: int = Field(0, ge=0)
    device: str = Field(
        "cpu", pattern=r"^(cpu|mps|(cuda|xpu)(:\d+)?)$"
    )  # the classifier's (the lung net runs on CPU)

    @model_validator(mode="after")
    def _extra_models_are_overrides(self) -> ClassifyConfig:
        if self.extra_models and self.folds == 1:
            raise ValueError("classify.extra_models are trained per fold: they need classify.folds > 1")
        for extra in self.extra_models:
            unknown = set(extra) - set(type(self).model_fields)
            if "model" not in extra or unknown or {"folds", "extra_models"} & set(extra):
                raise ValueError(
                    f"classify.extra_models entry {extra}: needs a 'model' and only classify settings "
                    f"other than folds and extra_models{f' (unknown: {sorted(unknown)})' if unknown else ''}"
                )
        return self

    def fold_models(self) -> list[ClassifyConfig]:
        """The configuration of each model trained per fold: this one, then each of ``extra_models``."""
        base = self.model_dump(exclude={"extra_models"})
        return [self, *(type(self).model_validate({**base, **extra}) for extra in self.extra_models)]


class SegmentConfig(Section):
    """Lung segmentation training and inference (owned by the segmentation stage)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    # slices (pipeline.segment.slices) and net (pipeline.models.lung_unet)
    size: int = Field(256, ge=16)
    window: tuple[float, float] = (-1024.0, 600.0)
    body_threshold: float = -500.0
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = Field(2, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    precision: Precision = "auto"  # of the net, in training, validation and inference
    # optimisation (pipeline.train.loop); early stopping on validation Dice
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int | None = Field(10, ge=1)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # validate and save an EMA of the weights
    augment: bool = True
    slices_per_volume: int | None = Field(None, ge=1)  # axial slices sampled from each 3D training volume
    # inference and post-processing (pipeline.segment.postprocess)
    infer_batch: int = Field(4, ge=1)
    flip_tta: bool = False  # predict/evaluate average each slice's scores with its mirror's (2x net time)
    keep_components: int = Field(2, ge=1)
    max_hole_mm2: float = Field(2000.0, ge=0)
    min_aerated: float = Field(0.5, ge=0, le=1)  # a kept component's fraction of voxels below -400 HU
    label_sides: bool = True


class PredictConfig(Section):
    """New scans (a folder, a file or a manifest) that ``medpipe run`` predicts on, per task."""

    classify: Path | None = None
    segment: Path | None = None
    workers: int = Field(0, ge=0)


Stage = Literal["preprocess", "classify", "segment", "predict", "report"]


class Config(Section):
    """The whole experiment. ``stages`` lists what ``medpipe run`` does, in order: classify and
    segment each mean train then evaluate; predict runs every task ``predict`` names."""

    name: str = "default"
    run: Path | None = None
    stages: list[Stage] = ["preprocess"]
    io: IOConfig = IOConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    classify: ClassifyConfig = ClassifyConfig()
    segment: SegmentConfig = SegmentConfig()
    predict: PredictConfig = PredictConfig()

    @property
    def run_dir(self) -> Path:
        """The run folder: ``run`` if given, else ``runs/<name>``."""
        return self.run if self.run is not None else Path("runs") / self.name


# Data paths: relative ones in a config file are taken from the file's folder, and every one is
# stored absolute, so a config saved in a run folder still points at the same data.
PATH_KEYS = (("data", "manifest"), ("data", "input"), ("predict", "classify"), ("predict", "segment"))


def load_config(path: str | Path | None = None, **overrides: object) -> Config:
    """Load a YAML config (or the defaults) and apply dotted-key overrides such as ``io.allow_2d``.

    Relative data paths in the file are taken relative to the file's folder, and relative paths given
    as overrides relative to the working directory (see ``PATH_KEYS``).
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(
                f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections")
        for section, key in PATH_KEYS:  # other types are left for validation to name
            value = raw[section].get(key) if isinstance(raw.get(section), dict) else None
            if isinstance(value, str) and not Path(value).is_absolute():
                raw[section][key] = str((path.parent / value).resolve())
    for dotted, value in overrides.items():
        if value is None:
            continue
        if tuple(dotted.split(".")) in PATH_KEYS:  # a path given on the command line: from the cwd
            value = str(Path(str(value)).resolve())
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path or 'config'}: {part}: should be a mapping of keys, got {node!r}")
        node[leaf] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        source = f"{path}" if path is not None else "config"
        raise ValueError(f"{source}: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """Pydantic's errors as one line each, ``section.key: message``, with the nearest valid key
    for a misspelt one (``preprocess.spacng: unknown key; did you mean 'spacing'?``)."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            near = difflib.get_close_matches(loc[-1], _keys_at(loc[:-1]), n=1)
            message = "unknown key" + (f"; did you mean {near[0]!r}?" if near else "")
        elif isinstance(error.get("input"), (str, int, float, bool)):
            message += f", got {error['input']!r}"
        lines.append(f"{'.'.join(loc)}: {message}")
    return "; ".join(lines)


def _keys_at(loc: list[str]) -> list[str]:
    """The field names of the config section at ``loc`` (empty if it is not a section)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def config_yaml(config: Config) -> str:
    """The resolved config, every key with its value, as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(config_yaml(config), encoding="utf-8")
    return Path(path)
