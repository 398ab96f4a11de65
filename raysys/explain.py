"""Heat maps of where the CNN looked, per subtype: Grad-CAM and LayerCAM on one of InceptionV3's mixed blocks.

`explain(model, images, device)` runs the same forward pass as `raysys.engine.infer` (same input, same
precision, so the probabilities are the served ones) while keeping one block's activations A (B, K, h, w),
then takes the gradient of each of the six logits with respect to A in one batched backward pass that
stops at that block (is_grads_batched: six vector-Jacobian products, no backward through the layers below).

    gradcam:  relu(sum_k mean_xy(dlogit/dA_k) * A_k)        (Selvaraju et al. 2017)
    layercam: relu(sum_k relu(dlogit/dA_k) * A_k)           (Jiang et al. 2021; sharper on shallower blocks)

Each map is upsampled (bilinear) to the input size and scaled to [0, 1] by its own maximum; a map with no
positive evidence is all zeros. The block sets the resolution: the input is downsampled 8x by Mixed_5d,
17x by Mixed_6e and 32x by Mixed_7c (at 96 px: 9x9, 4x4, 1x1 cells; at 256 px: 29, 14, 6).
`benchmarks/pointing_game.py` scores the choices on phantom bleeds; DEFAULT_LAYER and DEFAULT_METHOD are
what it measured best.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from raysys.engine import INFERENCE_AMP, _inputs, autocast, use_amp
from raysys.labels import LABELS
from raysys.model import unwrap

LAYERS = ("Mixed_5d", "Mixed_6e", "Mixed_7c")
METHODS = ("gradcam", "layercam")
DEFAULT_LAYER = "Mixed_5d"
DEFAULT_METHOD = "layercam"


def explain(model: nn.Module, images: torch.Tensor | np.ndarray, device: torch.device, *,
            layer: str = DEFAULT_LAYER, method: str = DEFAULT_METHOD) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (B, 6) float32, heat maps (B, 6, S, S) float32 in [0, 1]) for uint8 images (B, C, S, S).

    The model must be in eval mode (as for `infer`); its weights are not changed and get no gradients."""
    if layer not in LAYERS or method not in METHODS:
        raise ValueError(f"explain: layer must be one of {LAYERS} and method one of {METHODS}, got {layer}, {method}")
    net = unwrap(model)
    block = getattr(net.net, layer)
    seen: list[torch.Tensor] = []
    hook = block.register_forward_hook(lambda _module, _args, out: seen.append(out))
    x = _inputs(images, model, device)
    try:
        with torch.enable_grad(), autocast(device, use_amp(INFERENCE_AMP, device)):
            logits = model(x).float()
            activations = seen[0]
            batch = len(x)
            # Row c of the batched grad_outputs picks logit c of every image: six backward passes in one.
            picks = torch.eye(len(LABELS), device=device).unsqueeze(1).expand(len(LABELS), batch, len(LABELS))
            (grads,) = torch.autograd.grad(logits, activations, grad_outputs=picks, is_grads_batched=True)
    finally:
        hook.remove()
    grads, activations = grads.float().detach(), activations.float().detach().unsqueeze(0)  # (6, B, K, h, w)
    if method == "gradcam":
        cam = (grads.mean(dim=(3, 4), keepdim=True) * activations).sum(dim=2)
    else:
        cam = (grads.clamp(min=0) * activations).sum(dim=2)
    cam = cam.clamp(min=0).transpose(0, 1)  # (B, 6, h, w)
    size = x.shape[-1]
    cam = nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False).clamp(min=0)
    peak = cam.amax(dim=(2, 3), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.zeros_like(cam))
    return torch.sigmoid(logits.detach()).cpu().numpy(), cam.cpu().numpy()


def png(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a (S, S) array: uint8 as is, floats in [0, 1] scaled to 0-255."""
    from PIL import Image

    if image.dtype != np.uint8:
        image = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(out, format="PNG")
    return out.getvalue()
