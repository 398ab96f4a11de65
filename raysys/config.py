"""Frozen config dataclasses per concern; loaded from YAML, then `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raysys import storage
from raysys.dicom import DEFAULT_LIMITS
from raysys.windowing import DEFAULT_WINDOWS, format_windows

CONFIG_FILE = "config.yaml"  # the resolved config, beside every run, sweep and checkpoint
MAX_NEIGHBORS = 4  # 2.5D input: at most 9 slices (27 channels) per image


class InputError(Exception):
    """What the user gave (a flag, a file, weights, data) cannot work; the message says what and how to fix it.

    The CLI prints it as one line without a traceback."""


SQLITE = "sqlite:///"  # an MLflow URI whose path follows; sqlite:////abs/x.db is absolute


def _resolve_fields(obj, *names: str) -> None:
    """Make the named path fields of a frozen config absolute (URIs untouched): the one place paths are resolved."""
    for name in names:
        object.__setattr__(obj, name, storage.resolve(getattr(obj, name)))


@dataclass(frozen=True)
class DataConfig:
    data: str = ""  # folder or URI (s3://, gs://, NFS path) of .dcm files, or a prepared cache
    labels: str = ""  # RSNA `ID,Label` CSV; empty for inference data
    windows: str = format_windows(DEFAULT_WINDOWS)  # brain, subdural, soft tissue: the reference recipe
    image_size: int = 256  # the reference recipe's 256 x 256
    val_fraction: float = 0.1  # share of patients held out when folds == 0
    folds: int = 0  # k > 0: split patients into k folds and validate on `fold`
    fold: int = 0  # which fold validates when folds > 0
    seed: int = 0  # split, balancing and augmentation all derive from it
    neg_ratio: float = 1.0  # negatives kept per positive each epoch (reference: 1.0, balanced)
    max_error_fraction: float = 0.001  # fail when more files than this are unreadable
    decode_cpus: float = 0.25  # CPUs reserved per decode task; small so 2-core machines still schedule
    neighbors: int = 0  # 2.5D: this many slices on each side (same series) join the slice as extra channels

    def __post_init__(self) -> None:
        _resolve_fields(self, "data", "labels")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.folds < 0 or (self.folds and not 0 <= self.fold < self.folds):
            raise ValueError(f"data.fold must be in [0, {self.folds}), got {self.fold}")
        if self.folds == 1:
            raise ValueError("data.folds must be 0 (single split) or >= 2")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0 (numpy seeds are non-negative), got {self.seed}")
        if self.image_size < 75:
            raise ValueError(f"data.image_size must be >= 75 (InceptionV3's minimum), got {self.image_size}")
        if self.neg_ratio <= 0:
            raise ValueError(f"data.neg_ratio must be > 0, got {self.neg_ratio}")
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"data.max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.decode_cpus <= 0:
            raise ValueError(f"data.decode_cpus must be > 0, got {self.decode_cpus}")
        if not 0 <= self.neighbors <= MAX_NEIGHBORS:
            raise ValueError(f"data.neighbors must be in [0, {MAX_NEIGHBORS}], got {self.neighbors}")


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
    on: str = "data"  # "data": albumentations on the CPU data workers; "device": batched torch on the GPU

    def __post_init__(self) -> None:
        if self.on not in ("data", "device"):
            raise ValueError(f"augment.on must be data or device, got {self.on!r}")
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

    def __post_init__(self) -> None:
        if self.weights.lower() not in ("none", "imagenet"):
            _resolve_fields(self, "weights")


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "aot_eager")  # raysys.engine.compile_step


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
    amp: str = "auto"  # "auto": bf16 autocast on CUDA from engine.BF16_MIN_BATCH per worker; "bf16" forces it; "off"
    compile: str = "off"  # torch.compile the training step (COMPILE_MODES); off: measured slower on CPUs (README)
    max_steps_per_epoch: int = 0  # 0 = a full pass; > 0 caps steps (smoke tests)
    pin_memory: bool = False  # CUDA only: batches in page-locked memory, copied to the GPU without blocking the host
    mlflow_uri: str = ""  # MLflow tracking URI (http://..., sqlite:///..., a folder): params, epochs, best checkpoint
    mlflow_experiment: str = "raysys"  # the MLflow experiment runs and sweep trials go to

    def __post_init__(self) -> None:
        _resolve_fields(self, "storage_path")
        if self.mlflow_uri and "://" not in self.mlflow_uri and not self.mlflow_uri.startswith("databricks"):
            _resolve_fields(self, "mlflow_uri")  # a plain folder: MLflow's file store, made absolute here
        elif self.mlflow_uri.startswith(SQLITE) and not self.mlflow_uri[len(SQLITE):].startswith("/"):
            # sqlite:///mlflow.db is relative to the working directory, and Train workers run in their own
            object.__setattr__(self, "mlflow_uri", SQLITE + storage.resolve(self.mlflow_uri[len(SQLITE):]))
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError(f"train.epochs, batch_size and workers must be >= 1, "
                             f"got {self.epochs}, {self.batch_size}, {self.workers}")
        if self.lr <= 0 or not 0 < self.decay <= 1:
            raise ValueError(f"train.lr must be > 0 and decay in (0, 1], got {self.lr}, {self.decay}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"train.amp must be auto, bf16 or off, got {self.amp!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune over whole training runs; a sweep lives in `<storage_path>/<name>/`, its trials' runs under `trials/`."""

    storage_path: str = "runs"  # local folder or s3:// URI; the sweep's one location
    name: str = "sweep"  # a relaunch with the same name resumes the sweep
    num_samples: int = 4  # trials drawn from the search space
    max_epochs: int = 8  # epochs of a trial that ASHA never stops (the recipe's 8)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps the best 1/rf of trials at each rung
    lr_min: float = 1e-5  # log-uniform learning-rate bounds around the recipe's 5e-4
    lr_max: float = 3e-3
    decay_min: float = 0.5  # uniform per-epoch decay bounds around the recipe's 0.8
    decay_max: float = 1.0
    workers_per_trial: int = 0  # 0: train.workers
    max_trial_failures: int = 1  # retries of a crashed trial driver (Tune's FailureConfig)
    seed: int = 0  # search-space sampling

    def __post_init__(self) -> None:
        _resolve_fields(self, "storage_path")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError(f"sweep.lr_min/lr_max: need 0 < lr_min <= lr_max, got {self.lr_min}, {self.lr_max}")
        if not 0 < self.decay_min <= self.decay_max <= 1:
            raise ValueError(f"sweep.decay_min/decay_max: need 0 < min <= max <= 1, got {self.decay_min}, {self.decay_max}")
        if self.num_samples < 1 or self.max_epochs < 1 or not 1 <= self.grace_period <= self.max_epochs:
            raise ValueError("sweep: need num_samples >= 1, max_epochs >= 1 and 1 <= grace_period <= max_epochs, got "
                             f"{self.num_samples}, {self.max_epochs}, {self.grace_period}")
        if self.reduction_factor < 2 or self.workers_per_trial < 0:
            raise ValueError(f"sweep: need reduction_factor >= 2 and workers_per_trial >= 0, got "
                             f"{self.reduction_factor}, {self.workers_per_trial}")


@dataclass(frozen=True)
class SequenceConfig:
    """The study-context stage (`raysys train-sequence`): a bidirectional GRU over a trained CNN's per-slice outputs.

    Its run uses the data, split and train sections too (storage_path, name, workers, resources); defaults were
    chosen on held-out phantom studies (README, "Study context").
    """

    cnn: str = ""  # the trained CNN checkpoint directory (local path or URI) whose embeddings the stage reads
    epochs: int = 20  # passes over the training series; the best epoch by validation score is kept
    lr: float = 1e-3  # AdamW
    decay: float = 1.0  # lr x decay^epoch
    weight_decay: float = 1e-2  # AdamW's: a few hundred series are easy to overfit
    hidden: int = 32  # GRU width per direction
    dropout: float = 0.5  # on the projected slice inputs
    features: bool = True  # read the CNN's pooled features besides its logits (False: logits only)
    batch_size: int = 8  # series per step
    patience: int = 5  # stop after this many epochs without a better validation score (0: run every epoch)

    def __post_init__(self) -> None:
        if self.cnn:
            _resolve_fields(self, "cnn")
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1 or self.patience < 0:
            raise ValueError(f"sequence.epochs, batch_size and hidden must be >= 1 and patience >= 0, "
                             f"got {self.epochs}, {self.batch_size}, {self.hidden}, {self.patience}")
        if self.lr <= 0 or not 0 < self.decay <= 1 or self.weight_decay < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"sequence: need lr > 0, decay in (0, 1], weight_decay >= 0 and dropout in [0, 1), got "
                             f"{self.lr}, {self.decay}, {self.weight_decay}, {self.dropout}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)

    def __post_init__(self) -> None:
        if self.model.aux_logits and self.data.image_size < 299:
            raise ValueError(f"model.aux_logits needs data.image_size >= 299 (torchvision's aux head), "
                             f"got {self.data.image_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides) -> Config:
        """Copy with `section.key` overrides, e.g. replace(**{"train.lr": 1e-3})."""
        return from_dict(self.to_dict(), overrides)


@dataclass(frozen=True)
class InferenceConfig:
    """Batch inference (`raysys predict` / `evaluate`): an actor pool over Ray Data."""

    batch_size: int = 32  # images per forward pass
    actors: int = 1  # model replicas in the actor pool
    gpus_per_actor: float = 0.0  # 0 = CPU
    cpus_per_actor: float = 1.0  # a CPU actor's torch threads
    tta: str = "none"  # "hflip" averages a mirrored pass
    max_error_fraction: float = 1.0  # inference scores what it can; unreadable files are listed, not fatal

    @property
    def threads(self) -> int:
        """Torch threads of a CPU actor: its CPUs rounded up (1.75 CPUs run two threads, not Ray's one)."""
        return max(1, math.ceil(self.cpus_per_actor - 1e-9))

    def __post_init__(self) -> None:
        if self.tta not in ("none", "hflip"):
            raise ValueError(f"inference.tta must be none or hflip, got {self.tta!r}")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError(f"inference.batch_size and actors must be >= 1, got {self.batch_size}, {self.actors}")


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP endpoint (`raysys serve`, `serve run raysys.serve:app`)."""

    host: str = "127.0.0.1"  # loopback unless asked: Serve has no authentication of its own
    port: int = 8000  # Serve's default
    replicas: int = 1
    cpus_per_replica: float = 1.0  # also the replica's torch threads on CPU
    gpus_per_replica: float = 0.0
    max_batch_size: int = 16  # images per micro-batch
    batch_wait_ms: float = 10.0  # how long a batch waits to fill
    max_body_bytes: int = 20 * 1024 * 1024  # 20 MiB: an uncompressed 1024 x 1024 slice is 2 MiB
    max_files: int = 64  # files per multipart request: one request must not hold a replica for minutes
    max_image_side: int = DEFAULT_LIMITS.max_side  # rows/columns a DICOM header may claim (checked before decoding)
    max_image_bytes: int = DEFAULT_LIMITS.max_bytes  # decoded pixel bytes a header may claim
    token_file: str | None = None  # a file on every node holding the bearer token; unset: the node's RAYSYS_API_TOKEN

    def __post_init__(self) -> None:
        if min(self.replicas, self.max_batch_size, self.max_body_bytes, self.max_files, self.max_image_side,
               self.max_image_bytes) < 1:
            raise ValueError("serve: replicas, max_batch_size, max_body_bytes, max_files, max_image_side and "
                             "max_image_bytes must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError(f"serve.batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.token_file:
            object.__setattr__(self, "token_file", str(Path(self.token_file).expanduser().resolve()))


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


def build_config(cls, values: dict, where: str = ""):
    """A config dataclass (Config, InferenceConfig, ServeConfig, ...) from a dict; unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_config(hints[key], value or {}, f"{where}.{key}" if where else key)
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
    return build_config(Config, merged, "")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """YAML file first (optional, local or URI), then `section.key` overrides (CLI flags)."""
    values = {}
    if path:
        values = yaml.safe_load(storage.read_text(path)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(values).__name__}")
    return from_dict(values, overrides)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, written beside every run, sweep and checkpoint."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, folder: str | Path) -> None:
    """`folder/config.yaml`: the resolved config beside a run or a sweep."""
    storage.write_text(storage.join(folder, CONFIG_FILE), config_yaml(cfg))
