"""Frozen config dataclasses per concern; loaded from YAML, then `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class DataConfig:
    data: str = ""  # folder or URI (s3://, gs://, NFS path) of .dcm files, or a prepared cache
    labels: str = ""  # RSNA `ID,Label` CSV; empty for inference data
    windows: str = "brain,subdural,soft_tissue"  # the reference recipe's three channels
    image_size: int = 256  # the reference recipe's 256 x 256
    val_fraction: float = 0.1  # share of patients held out when folds == 0
    folds: int = 0  # k > 0: split patients into k folds and validate on `fold`
    fold: int = 0  # which fold validates when folds > 0
    seed: int = 0  # split, balancing and augmentation all derive from it
    neg_ratio: float = 1.0  # negatives kept per positive each epoch (reference: 1.0, balanced)
    max_error_fraction: float = 0.001  # fail when more files than this are unreadable
    decode_cpus: float = 0.25  # CPUs reserved per decode task; small so 2-core machines still schedule

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ValueError(f"data.fold must be in [0, {self.folds}), got {self.fold}")
        if self.folds == 1:
            raise ValueError("data.folds must be 0 (single split) or >= 2")
        if self.image_size < 75:
            raise ValueError(f"data.image_size must be >= 75 (InceptionV3's minimum), got {self.image_size}")
        if self.neg_ratio <= 0:
            raise ValueError(f"data.neg_ratio must be > 0, got {self.neg_ratio}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"data.max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.decode_cpus <= 0:
            raise ValueError(f"data.decode_cpus must be > 0, got {self.decode_cpus}")


@dataclass(frozen=True)
class AugmentConfig:
    """Train-side augmentation; each probability is per image (reference: flips, +/-10 deg, S&P, affine)."""

    hflip: float = 0.5  # left/right symmetry of the head
    vflip: float = 0.5  # the reference recipe flips vertically too
    rotate: float = 0.5  # probability of a rotation ...
    rotate_limit: float = 10.0  # ... within +/- this many degrees (reference: 10)
    salt_pepper: float = 0.2  # probability of salt-and-pepper noise ...
    salt_pepper_amount: float = 0.01  # ... on this fraction of pixels
    affine: float = 0.3  # scale/shear deformation
    elastic: float = 0.0  # elastic deformation; off by default: ~8x slower than affine on CPU

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rotate", "salt_pepper", "affine", "elastic", "salt_pepper_amount"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value}")
        if not 0 <= self.rotate_limit <= 180:
            raise ValueError(f"augment.rotate_limit must be in [0, 180] degrees, got {self.rotate_limit}")


@dataclass(frozen=True)
class ModelConfig:
    weights: str = "imagenet"  # "none", "imagenet" (torchvision's), or a local state-dict / checkpoint path
    aux_logits: bool = False  # torchvision's aux head needs >= 299 px input; the recipe uses 256
    aux_weight: float = 0.4  # weight of the aux loss when aux_logits is on (torchvision's recipe)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8  # reference recipe
    batch_size: int = 24  # per worker; reference recipe
    lr: float = 5e-4  # Adam, reference recipe
    decay: float = 0.8  # lr x decay^epoch, reference recipe
    workers: int = 2  # data-parallel workers (one per GPU on a GPU cluster)
    gpus_per_worker: float = 0.0  # 0 trains on CPU (gloo); 1 per worker on GPU nodes
    cpus_per_worker: float = 0.5  # fractional so Ray Data tasks still fit on a 2-core machine
    storage_path: str = "runs"  # local folder or s3:// URI shared by all nodes
    name: str = "raysys"  # a relaunch with the same name resumes from its latest checkpoint
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    keep_checkpoints: int = 2  # best k by validation weighted log loss
    amp: str = "auto"  # "auto": bf16 autocast on CUDA only; "bf16" forces it; "off"
    max_steps_per_epoch: int = 0  # 0 = a full pass; > 0 caps steps (smoke tests)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError(f"train.epochs, batch_size and workers must be >= 1, got {self.epochs}, {self.batch_size}, {self.workers}")
        if self.lr <= 0 or not 0 < self.decay <= 1:
            raise ValueError(f"train.lr must be > 0 and decay in (0, 1], got {self.lr}, {self.decay}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be auto, bf16 or off, got {self.amp!r}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> Config:
        """Copy with `section.key` overrides, e.g. replace(**{"train.lr": 1e-3})."""
        return from_dict(self.to_dict(), overrides)


def _coerce(value, annotation, where: str):
    """Check (and for YAML/CLI strings, convert) one value against its field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{where}.{key}" if where else key)
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def from_dict(values: dict, overrides: dict | None = None) -> Config:
    """Config from nested dicts plus flat `section.key` overrides; unknown keys and bad types raise."""
    merged = {section: dict(body or {}) for section, body in (values or {}).items()}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ValueError(f"override {dotted!r} must look like section.key")
        merged.setdefault(section, {})[key] = value
    return _build(Config, merged, "")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """YAML file first (optional), then `section.key` overrides (CLI flags)."""
    values = {}
    if path:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    return from_dict(values, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config beside a run or checkpoint."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
