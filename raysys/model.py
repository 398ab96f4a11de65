"""InceptionV3 with a 6-label head, its input contract, and save/load of a checkpoint directory."""

from __future__ import annotations

import json
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from raysys import storage
from raysys.config import CONFIG_FILE, InputError
from raysys.labels import ANY, LABELS

MIN_SIZE = 75  # InceptionV3's smallest input without the aux head
AUX_MIN_SIZE = 299  # the aux head's 5x5 conv needs a 17x17 map, i.e. >= 299 px input
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_FILE = "model.pt"  # weights + optimizer + scheduler + epoch
META_FILE = "meta.json"  # everything needed to reproduce preprocessing, readable without torch


@dataclass(frozen=True)
class InputContract:
    """What the network expects: (channels, size, size) in [0, 1], then normalised per channel."""

    size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN  # torchvision's InceptionV3 (transform_input) expects these
    std: tuple[float, ...] = IMAGENET_STD


def unbalance(logits: torch.Tensor, any_offset: torch.Tensor) -> torch.Tensor:
    """Logits learned on balanced epochs, at the training set's own prevalence (float32).

    Balancing keeps every slice with a bleed and a share of the others, chosen by `any` alone. So `any`'s odds
    were inflated by a constant factor, which `any_offset` (the log of the share of negatives kept, <= 0) removes.
    A subtype's probability given a bleed was not changed by the sampling: p_k = p_k(balanced) x a, with
    a = p_any / p_any(balanced) <= 1, a factor of each image (near 1 on a slice that clearly bleeds, where a
    constant shift per label pulled every subtype down alike). In logits, logit(p a) = z + log a
    - softplus(z + log(1 - a)). Where a = 1 (no balancing: offset 0; or `any` certain) the subtypes' logits come
    back as they were, and an offset > 0 (which no balancing gives) moves `any` alone.
    """
    z = logits.float()
    z_any = z[:, ANY] + any_offset
    log_a = nn.functional.logsigmoid(z_any) - nn.functional.logsigmoid(z[:, ANY])
    scaled = (log_a < 0)[:, None]
    safe = torch.where(log_a < 0, log_a, -1.0)[:, None]  # finite values (and gradients) in the branch not taken
    corrected = z[:, :ANY] + safe - nn.functional.softplus(z[:, :ANY] + torch.log(-torch.expm1(safe)))
    subtypes = torch.where(scaled, corrected, z[:, :ANY])
    return torch.cat([subtypes, z_any[:, None]], dim=1)  # `any` is the last label


class HemorrhageNet(nn.Module):
    """InceptionV3 plus the correction that undoes training-time class balancing.

    Training sees negatives undersampled, which inflates the odds of a bleed by a known
    factor; in eval mode `unbalance` removes it with `logit_offset[any]` (set by train.py,
    saved in the checkpoint; the subtypes' entries are not used), so predicted
    probabilities match the real prevalence. Train mode returns the raw logits
    (InceptionOutputs when the aux head is on).
    """

    def __init__(self, net: nn.Module, contract: InputContract, neighbors: int = 0):
        super().__init__()
        self.net = net
        self.contract = contract
        self.neighbors = neighbors
        self.register_buffer("logit_offset", torch.zeros(len(LABELS)))
        if neighbors:
            # torchvision's transform_input (ImageNet normalisation -> the (x - 0.5) / 0.5 Google's weights
            # expect) knows three channels; a 2.5D input gets the same per window, for every slice.
            std, mean = torch.tensor(contract.std), torch.tensor(contract.mean)
            self.register_buffer("input_scale", (std / 0.5).view(1, -1, 1, 1))
            self.register_buffer("input_shift", ((mean - 0.5) / 0.5).view(1, -1, 1, 1))

    @property
    def aux_logits(self) -> bool:
        return bool(self.net.aux_logits)

    def network_logits(self, x: torch.Tensor):
        """The network's own logits, before `unbalance` (InceptionOutputs in train mode with the aux head)."""
        if self.neighbors:
            x = x * self.input_scale + self.input_shift
        return self.net(x)

    def forward(self, x: torch.Tensor):
        out = self.network_logits(x)
        return out if self.training else unbalance(out, self.logit_offset[ANY])


class WeightsError(InputError, ValueError):
    """The starting weights cannot be had or are not InceptionV3's."""


HEAD_KEYS = ("fc.", "AuxLogits.fc.", "logit_offset")  # rebuilt for the six labels; never taken from weights


def build_model(
    backbone: dict[str, torch.Tensor] | None = None, *, image_size: int = 256, aux_logits: bool = False,
    neighbors: int = 0, init: bool = True,
) -> HemorrhageNet:
    """torchvision inception_v3 with len(LABELS) outputs (logits; sigmoid at inference).

    backbone: None (random init) or a state dict from `load_backbone`, already checked there.
    neighbors > 0 (2.5D): the input holds 2 x neighbors + 1 slices of three windows each; the first
    convolution is widened to them, each slice's copy of the three-channel weights divided by the number
    of slices, so a stack of one slice repeated gives exactly the three-channel network's output.
    init=False skips torchvision's truncated-normal initialisation (1-4 s on 2 CPU cores) for a caller that loads
    every weight next (load_checkpoint): the network starts with PyTorch's default initialisation instead.
    """
    if image_size < MIN_SIZE:
        raise ValueError(f"InceptionV3 needs image_size >= {MIN_SIZE}, got {image_size}")
    if aux_logits and image_size < AUX_MIN_SIZE:
        raise ValueError(f"aux_logits needs image_size >= {AUX_MIN_SIZE} (torchvision's aux head), got {image_size}")
    from torchvision.models import inception_v3  # here, not at the top: see _imagenet_weights

    # transform_input=True: inputs arrive ImageNet-normalised (the contract) for every kind of weights.
    model = inception_v3(weights=None, aux_logits=True, init_weights=backbone is None and init,
                         transform_input=True)
    if backbone is not None:
        model.load_state_dict(backbone, strict=False)
    model.fc = nn.Linear(model.fc.in_features, len(LABELS))
    if aux_logits:
        model.AuxLogits.fc = nn.Linear(model.AuxLogits.fc.in_features, len(LABELS))
    else:
        model.aux_logits, model.AuxLogits = False, None
    if not neighbors:
        return HemorrhageNet(model, InputContract(size=image_size))
    slices = 2 * neighbors + 1
    conv = model.Conv2d_1a_3x3.conv
    wide = nn.Conv2d(conv.in_channels * slices, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                     bias=False)
    with torch.no_grad():
        wide.weight.copy_(conv.weight.repeat(1, slices, 1, 1) / slices)
    model.Conv2d_1a_3x3.conv, model.transform_input = wide, False
    contract = InputContract(size=image_size, channels=3 * slices, mean=IMAGENET_MEAN * slices, std=IMAGENET_STD * slices)
    return HemorrhageNet(model, contract, neighbors)


def load_backbone(weights: str) -> dict[str, torch.Tensor] | None:
    """The weights a run starts from, resolved and checked where the run is configured (on the driver).

    "none": None (random init). "imagenet": torchvision's ImageNet weights, downloaded once into
    torch's cache. Anything else: a state-dict file or a raysys checkpoint directory (local or URI).
    A bad value fails here, in seconds and once, never in a worker that would be retried.
    """
    kind = weights.lower()
    if kind == "none":
        return None
    if kind == "imagenet":
        return _backbone_of(_download_imagenet(), _imagenet_weights().url)
    path = storage.join(weights, STATE_FILE) if storage.is_dir(weights) else weights
    if not storage.is_file(path):
        raise WeightsError(f"weights {weights}: no such file (expected a state dict or a checkpoint directory)")
    try:
        state = torch.load(storage.open_bytes(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch's own errors: any of them means "not a state dict"
        raise WeightsError(f"weights {path}: not a torch state dict ({type(e).__name__}: {e})") from None
    return _backbone_of(state, path)


def _imagenet_weights():
    """torchvision's ImageNet InceptionV3 weights entry. torchvision is imported only where a network is built or
    its weights fetched: importing it costs ~1.7 s on 2 cores, most of it torch._dynamo, which a process that never
    builds one (a Serve ingress, the CLI) need not pay. A training process imports torch._dynamo anyway: torch's
    optimizers do on construction."""
    from torchvision.models import Inception_V3_Weights

    return Inception_V3_Weights.IMAGENET1K_V1


def _download_imagenet() -> dict:
    url = _imagenet_weights().url
    try:
        return _imagenet_weights().get_state_dict(progress=False)
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(
            f"could not download the ImageNet weights ({e}). Offline, fetch {url} on a machine with "
            "internet and pass its local path instead: --weights /path/to/inception_v3_google-0cc3c7bd.pth "
            "(or --weights none to train from scratch)"
        ) from None


def _backbone_of(state, source: str) -> dict[str, torch.Tensor]:
    """An ImageNet state dict or a raysys checkpoint's weights -> InceptionV3 backbone keys, checked."""
    if not isinstance(state, dict):
        raise WeightsError(f"weights {source}: expected a state dict, got {type(state).__name__}")
    state = state.get("model", state)
    state = {k.removeprefix("module.").removeprefix("net."): v for k, v in state.items()}
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    from torchvision.models import inception_v3

    probe = inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        missing, unexpected = probe.load_state_dict(backbone, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"weights {source}: not an InceptionV3 state dict ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith(("fc.", "AuxLogits."))]
    if missing or unexpected:
        raise WeightsError(f"weights {source}: not an InceptionV3 state dict (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return backbone


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (and torch.compile) wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


# --- checkpoints --------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: ready model (eval mode) plus everything that made it."""

    model: nn.Module
    meta: dict  # labels, windows, image_size, contract, epoch, metrics
    config: dict  # the resolved run config
    state: dict  # optimizer / scheduler state for resuming


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    config: dict,
    epoch: int,
    metrics: dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    extra_meta: dict | None = None,
) -> Path:
    """Write model.pt, meta.json and config.yaml into the local `directory` (created if needed)."""
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = unwrap(model)
    torch.save(
        {
            "model": plain.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else None,
            "scheduler": scheduler.state_dict() if scheduler else None,
            "epoch": epoch,
        },
        directory / STATE_FILE,
    )
    meta = {
        "labels": list(LABELS),
        "windows": config["data"]["windows"],
        "image_size": plain.contract.size,
        "contract": asdict(plain.contract),
        "aux_logits": plain.aux_logits,
        "neighbors": plain.neighbors,
        "logit_offset": plain.logit_offset.tolist(),
        "epoch": epoch,
        "metrics": metrics,
        **(extra_meta or {}),
    }
    (directory / META_FILE).write_text(storage.to_json(meta))
    with open(directory / CONFIG_FILE, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return directory


def read_meta(directory: str | Path) -> dict:
    """meta.json of a checkpoint directory (local or URI), with a clear error when it is not one."""
    path = storage.join(directory, META_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{directory}: not a raysys checkpoint (no {META_FILE})")
    meta = json.loads(storage.read_text(path))
    if meta.get("labels") != list(LABELS):
        raise ValueError(f"{directory}: checkpoint label order {meta.get('labels')} differs from {list(LABELS)}")
    return meta


def read_state(directory: str | Path) -> dict:
    """model.pt of a checkpoint directory: model, optimizer and scheduler state and the epoch (for resuming)."""
    return torch.load(storage.open_bytes(storage.join(directory, STATE_FILE)), map_location="cpu", weights_only=True)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """The one loader for batch inference and serving: eval mode, on `device`, channels_last.

    For a sequence checkpoint (raysys.sequence), its CNN."""
    import yaml

    local = storage.local_dir(directory)
    meta = read_meta(local)
    if meta.get("stage") == "sequence":  # its CNN: what every per-slice reader of the checkpoint needs
        from raysys.sequence import resolve_cnn

        return load_checkpoint(resolve_cnn(str(local), meta), device)
    config = yaml.safe_load((local / CONFIG_FILE).read_text()) if (local / CONFIG_FILE).is_file() else {}
    model = build_model(image_size=meta["image_size"], aux_logits=meta.get("aux_logits", False),
                        neighbors=meta.get("neighbors", 0), init=False)  # the state below sets every weight
    state = read_state(local)
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last).eval()  # see raysys.engine's INFERENCE_AMP
    return Checkpoint(model=model, meta=meta, config=config, state=state)
