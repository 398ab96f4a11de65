"""train_one_epoch, and the one forward pass of validation, batch predict and Serve, in plain torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from raysys.labels import ANY, LABELS
from raysys.metrics import LABEL_WEIGHTS, WORST_LOG_LOSS, per_class_auc, per_class_log_loss, weighted_log_loss
from raysys.model import unwrap
from raysys.presets import to_model_input


class WeightedBCE(nn.Module):
    """The competition metric as a loss: BCE per cell x (any = 2, others 1), / (sum of weights x N)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(LABEL_WEIGHTS, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cells = nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
        return (cells * self.weights).sum() / (self.weights.sum() * len(targets))


def autocast(device: torch.device, amp: bool):
    """bf16 autocast where asked; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


# The smallest batch per worker at which "auto" trains in bf16 on CUDA. On one H200 (benchmarks/gpu_check.sh,
# InceptionV3 at 256 px, torch 2.11) the step alone trained faster in fp32 (TF32 convolutions) + channels_last
# at the recipe's batch 24 and at 64, where the step is launch-bound (815 vs 662, 1,629 vs 1,551 img/s), and
# 1.33x faster in bf16 at 256 (3,430 vs 2,574 img/s). 128 was not measured.
BF16_MIN_BATCH = 256


def use_amp(setting: str, device: torch.device, batch_size: int | None = None) -> bool:
    """Whether to autocast to bf16. "bf16" always, "off" never; "auto" on CUDA only (on CPU bf16 is slower on most
    chips and changes numerics), and for a training step (`batch_size` given) only from BF16_MIN_BATCH images."""
    if setting == "auto":
        return device.type == "cuda" and (batch_size is None or batch_size >= BF16_MIN_BATCH)
    return setting == "bf16"


# The one precision policy of inference (validation, batch predict and Serve alike), so a served number
# is the validated number: bf16 autocast + channels_last on CUDA, fp32 channels_last on CPU (on a 2-core
# Intel Xeon, benchmarks/train_throughput.py: inference 1.18-1.51x and training 1.07-1.23x fp32 NCHW's).
INFERENCE_AMP = "auto"


def compile_step(model: nn.Module, setting: str) -> nn.Module:
    """The module the training step calls under `train.compile`: the model itself ("off"), torch.compile with that
    inductor mode ("default", "reduce-overhead": CUDA graphs, "max-autotune"), or torch.compile's aot_eager backend,
    which traces forward and backward as compilation does and runs them eagerly (seconds instead of minutes: a
    check that the model compiles). Its first step compiles; it shares the model's parameters."""
    if setting == "off":
        return model
    if setting == "aot_eager":
        return torch.compile(model, backend="aot_eager")
    return torch.compile(model, mode=setting)


def _inputs(images: torch.Tensor | np.ndarray, model: nn.Module, device: torch.device) -> torch.Tensor:
    """(B, C, S, S) uint8 -> the model's normalised float input on `device`, channels_last."""
    contract = unwrap(model).contract
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray Data hands out read-only views; torch refuses to wrap those silently
    x = to_model_input(torch.as_tensor(images).to(device, non_blocking=True), contract.mean, contract.std)
    return x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def infer(model: nn.Module, images: torch.Tensor | np.ndarray, device: torch.device, *, tta: str = "none") -> np.ndarray:
    """Sigmoid probabilities (B, 6) float32 for uint8 images (B, C, S, S) and a model in eval mode.

    The one forward pass of validation, batch predict and Serve. tta="hflip" averages a mirrored pass.
    """
    x = _inputs(images, model, device)
    with autocast(device, use_amp(INFERENCE_AMP, device)):
        p = torch.sigmoid(model(x).float())
        if tta == "hflip":
            p = (p + torch.sigmoid(model(torch.flip(x, dims=[3])).float())) / 2
    return p.cpu().numpy()


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor | np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(features (B, F) float32, logits (B, 6) float32) of uint8 images (B, C, S, S), one forward pass.

    features: the pooled vector InceptionV3's classifier reads (F = 2048); logits: what `infer` turns into
    probabilities (the checkpoint's logit offset included). The sequence stage's input.
    """
    head = unwrap(model).net.fc
    seen = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        with autocast(device, use_amp(INFERENCE_AMP, device)):
            logits = model(_inputs(images, model, device)).float()
    finally:
        hook.remove()
    return seen[0].float().cpu().numpy(), logits.cpu().numpy()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    *,
    amp: bool = False,
    aux_weight: float = 0.4,
    max_steps: int = 0,
    augment: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> dict:
    """One pass over `batches` ({"image": uint8 (B, C, S, S), "label": float (B, 6)}); returns loss and speed.

    augment: raysys.device_augment.DeviceAugment (or any f(images, seeds)) applied on the device, seeded by each
    row's `aug_seed`; None when the data workers augmented already.
    """
    model.train()
    # The loss is summed on the device and read once, at the end: reading it every step (loss.item()) would make
    # the host wait for each step's last kernel before it fetches the next batch and queues the next step.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    images, steps, skipped, start, first_batch = 0, 0, 0, time.perf_counter(), None
    first_step, waited = 0.0, 0.0
    stream = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(stream, None)
        waited += time.perf_counter() - asked  # the host blocked on the data pipeline (first batch and end included)
        if batch is None:
            break
        if first_batch is None:
            first_batch = time.perf_counter() - start  # pipeline start-up: a long one means the data is late
        if len(batch["label"]) < 2:
            # BatchNorm cannot train on one image. Ray Train splits epochs equally across ranks, so every
            # rank meets this last one-image batch at the same step and DDP stays in step.
            skipped += 1
            continue
        pixels = batch["image"]
        if augment is not None:
            pixels = augment(pixels.to(device, non_blocking=True), batch["aug_seed"].tolist())
        x, y = _inputs(pixels, model, device), batch["label"].to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(x)
        if isinstance(out, tuple):  # InceptionOutputs(logits, aux_logits) when the aux head is on
            loss = loss_fn(out[0], y) + aux_weight * loss_fn(out[1], y)
        else:
            loss = loss_fn(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(y)
        images += len(y)
        steps += 1
        if steps == 1:  # a compiled model compiles here: its first step is mostly compilation
            first_step = time.perf_counter() - start - first_batch
        if on_step:
            on_step(steps, images, time.perf_counter() - start)
        if max_steps and steps >= max_steps:
            break
    total = total_loss.item()  # waits for the last step: the epoch's time includes it
    seconds = time.perf_counter() - start
    return {"train_loss": total / max(images, 1), "train_images": images, "train_seconds": seconds,
            "train_images_per_s": images / seconds if seconds > 0 else 0.0, "first_batch_seconds": first_batch or 0.0,
            "first_step_seconds": first_step, "data_wait_seconds": waited, "train_steps": steps,
            "train_skipped_batches": skipped}


def score_batches(model: nn.Module, batches: Iterable[dict], device: torch.device) -> dict:
    """Probabilities for every row of `batches` (through `infer`), with the ids and labels they came with."""
    model.eval()
    probs, labels, ids = [], [], []
    for batch in batches:
        probs.append(infer(model, batch["image"], device))
        if "label" in batch:
            labels.append(np.asarray(batch["label"].cpu() if torch.is_tensor(batch["label"]) else batch["label"]))
        if "image_id" in batch:
            ids.extend(batch["image_id"])
    out = {"probabilities": np.concatenate(probs) if probs else np.zeros((0, 6), np.float32), "image_ids": ids}
    if labels:
        out["labels"] = np.concatenate(labels)
    return out


def validate(model: nn.Module, batches: Iterable[dict], device: torch.device) -> dict:
    """Validation metrics of a model over labelled image batches (validation_metrics, plus val_seconds)."""
    start = time.perf_counter()
    out = score_batches(model, batches, device)
    return {**validation_metrics(out["labels"], out["probabilities"]), "val_seconds": time.perf_counter() - start}


def validation_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """The competition score, per-class log loss and AUC, and the positives seen, for labels y and probabilities p.

    `val_degenerate` is 1 when no validation image has a bleed (`any` = 0 everywhere): the score
    then measures only how confidently negatives are called negative. `val_diverged` is 1 when the model's
    outputs are not finite (NaN weights): it then scores WORST_LOG_LOSS, the worst the clipped metric can give,
    instead of crashing the run. Not infinity: Ray Train keeps its checkpoints' scores as JSON, where infinity
    reads back as null and breaks the ranking of every later checkpoint when the run is relaunched.
    """
    positives = int(y[:, ANY].sum())
    counts = {"val_images": int(len(y)), "val_positives": positives, "val_degenerate": int(positives == 0)}
    if not np.isfinite(p).all():
        return {"val_weighted_log_loss": WORST_LOG_LOSS, "val_per_class_log_loss": dict.fromkeys(LABELS, WORST_LOG_LOSS),
                "val_per_class_auc": dict.fromkeys(LABELS, float("nan")), **counts, "val_diverged": 1}
    return {
        "val_weighted_log_loss": weighted_log_loss(y, p),
        "val_per_class_log_loss": per_class_log_loss(y, p),
        "val_per_class_auc": per_class_auc(y, p),
        **counts,
        "val_diverged": 0,
    }
