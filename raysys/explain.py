"""Heat maps of where the CNN looked, per subtype: input-gradient saliency (the default), Grad-CAM and LayerCAM.

`explain(model, images, device)` runs the same forward pass as `raysys.engine.infer` (same input, same
precision, so the probabilities are the served ones), then takes the gradient of each logit asked for (all six by
default) in one batched backward pass (is_grads_batched: one vector-Jacobian product per label):

    saliency: |dlogit/dx| summed over the input channels, Gaussian-smoothed (sigma = SALIENCY_SIGMA x size)
              (Simonyan et al. 2014); the backward pass runs down to the input, at the input's resolution
    gradcam:  relu(sum_k mean_xy(dlogit/dA_k) * A_k)        (Selvaraju et al. 2017), A = a block's activations
    layercam: relu(sum_k relu(dlogit/dA_k) * A_k)           (Jiang et al. 2021)

For the CAM methods the backward pass stops at the chosen block, whose resolution is the map's: the input is
downsampled 8x by Mixed_5d, 17x by Mixed_6e and 32x by Mixed_7c (at 96 px: 9x9, 4x4, 1x1 cells).
Each map is upsampled (bilinear) to the input size where needed and scaled to [0, 1] by its own maximum; a map
with no evidence is all zeros.

Why saliency is the default: benchmarks/pointing_game.py scored every method on held-out phantom bleeds with
the demo's 96 px CNN (195 bleeding slices): the maximum of the `any` map fell inside the bleed (2 px tolerance)
for 49% of slices with saliency against 10.5% for a random point in the head, while no CAM variant beat chance
(4x4 and 1x1 cells cannot point, and the 9x9 ones did not either).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from raysys.engine import INFERENCE_AMP, _inputs, autocast, use_amp
from raysys.labels import ANY, LABELS
from raysys.model import unbalance, unwrap

LAYERS = ("Mixed_5d", "Mixed_6e", "Mixed_7c")  # blocks the CAM methods read
INPUT = "input"  # the "layer" of saliency: its gradient is taken at the model's input
METHODS = ("saliency", "gradcam", "layercam")
DEFAULT_METHOD = "saliency"
DEFAULT_LAYER = INPUT
VARIANTS = ((INPUT, "saliency"), *((layer, m) for layer in LAYERS for m in ("gradcam", "layercam")))  # (layer, method)
SALIENCY_SIGMA = 0.02  # smoothing of saliency maps, share of the input size (2 px at 96 px)


def explain(model: nn.Module, images: torch.Tensor | np.ndarray, device: torch.device, *,
            layer: str = DEFAULT_LAYER, method: str = DEFAULT_METHOD,
            labels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (B, 6) float32, heat maps (B, L, S, S) float32 in [0, 1]) for uint8 images (B, C, S, S).

    labels: the indices (into LABELS) of the maps wanted, in that order; default all six. Each map costs a
    vector-Jacobian product, so one label costs about a third of six (benchmarks/explain_latency.py).
    The model must be in eval mode (as for `infer`); its weights are not changed and get no gradients."""
    labels = list(range(len(LABELS))) if labels is None else list(labels)
    if not labels or any(not 0 <= k < len(LABELS) for k in labels):
        raise ValueError(f"explain: labels must be indices into the {len(LABELS)} labels, at least one; got {labels}")
    saliency = method == "saliency"
    if method not in METHODS or (saliency and layer != INPUT) or (not saliency and layer not in LAYERS):
        raise ValueError(f"explain: method must be one of {METHODS}; saliency reads layer {INPUT!r}, the others one "
                         f"of {LAYERS}; got {method}, {layer}")
    seen: list[torch.Tensor] = []
    hook = None if saliency else getattr(unwrap(model).net, layer).register_forward_hook(
        lambda _module, _args, out: seen.append(out))
    x = _inputs(images, model, device)
    if saliency:
        x.requires_grad_(True)
    try:
        with torch.enable_grad(), autocast(device, use_amp(INFERENCE_AMP, device)):
            # The maps follow the network's own logits; the balancing correction (model.unbalance) only
            # calibrates them into the probabilities returned.
            logits = unwrap(model).network_logits(x).float()
            target = x if saliency else seen[0]
            # Row c of the batched grad_outputs picks logit labels[c] of every image: L backward passes in one.
            picks = torch.eye(len(LABELS), device=device)[labels].unsqueeze(1).expand(len(labels), len(x), len(LABELS))
            (grads,) = torch.autograd.grad(logits, target, grad_outputs=picks, is_grads_batched=True)
    finally:
        if hook is not None:
            hook.remove()
    grads = grads.float().detach()  # (L, B, K, h, w)
    size = x.shape[-1]
    if saliency:
        cam = grads.abs().sum(dim=2).transpose(0, 1)  # (B, L, S, S)
        sigma = SALIENCY_SIGMA * size
        radius = max(1, round(3 * sigma))
        cam = gaussian_blur(cam, kernel_size=[2 * radius + 1] * 2, sigma=[sigma] * 2)
    else:
        activations = target.float().detach().unsqueeze(0)
        if method == "gradcam":
            cam = (grads.mean(dim=(3, 4), keepdim=True) * activations).sum(dim=2)
        else:
            cam = (grads.clamp(min=0) * activations).sum(dim=2)
        cam = cam.clamp(min=0).transpose(0, 1)  # (B, L, h, w)
        cam = nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    cam = cam.clamp(min=0)
    peak = cam.amax(dim=(2, 3), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.zeros_like(cam))
    probabilities = torch.sigmoid(unbalance(logits.detach(), unwrap(model).logit_offset[ANY]))
    return probabilities.cpu().numpy(), cam.cpu().numpy()


def png(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a (S, S) array: uint8 as is, floats in [0, 1] scaled to 0-255."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(out, format="PNG")
    return out.getvalue()
