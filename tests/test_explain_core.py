"""Heat maps (raysys.explain) against independent computations: CAM from the classifier's weights, and one
backward pass per subtype."""

import numpy as np
import pytest
import torch
from torch import nn

from raysys.engine import _inputs, infer
from raysys.explain import LAYERS, explain, png
from raysys.labels import LABELS
from raysys.model import build_model
from raysys.testing import settle_batchnorm

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(images):
    torch.manual_seed(0)
    m = settle_batchnorm(build_model(image_size=128), images)  # probabilities away from 0 and 1
    m.logit_offset.copy_(torch.linspace(-1, -0.5, len(LABELS)))  # balancing's: the maps follow the network's logits
    return m


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 3, 128, 128), dtype=np.uint8)


def _normalise(cam: torch.Tensor, size: int) -> np.ndarray:
    cam = nn.functional.interpolate(cam.clamp(min=0), size=(size, size), mode="bilinear", align_corners=False).clamp(min=0)
    peak = cam.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.zeros_like(cam)).numpy()


def test_probabilities_are_the_served_ones(model, images):
    probabilities, maps = explain(model, images, CPU)
    np.testing.assert_array_equal(probabilities, infer(model, images, CPU))
    assert maps.shape == (3, len(LABELS), 128, 128) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(m.max() in (0.0, 1.0) for m in maps.reshape(-1, 128 * 128))  # each map scaled by its own peak


def test_gradcam_on_the_last_block_is_cam_from_the_classifier_weights(model, images):
    """At Mixed_7c, d logit_c / d A_k is fc.weight[c, k] / (h w) everywhere, so Grad-CAM is CAM (Zhou et al. 2016)."""
    seen = []
    hook = model.net.Mixed_7c.register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(_inputs(images, model, CPU))
    hook.remove()
    cam = torch.einsum("ck,bkhw->bchw", model.net.fc.weight.detach(), seen[0])
    _, maps = explain(model, images, CPU, layer="Mixed_7c", method="gradcam")
    np.testing.assert_allclose(maps, _normalise(cam, 128), atol=1e-4)


@pytest.mark.parametrize("layer", LAYERS[:2])
def test_each_subtype_map_is_its_own_backward_pass(model, images, layer):
    """The six maps of the one batched backward equal six separate backward passes (LayerCAM and Grad-CAM)."""
    seen = []
    hook = getattr(model.net, layer).register_forward_hook(lambda _m, _a, out: seen.append(out))
    logits = model.network_logits(_inputs(images, model, CPU))
    hook.remove()
    activations = seen[0]
    grads = [torch.autograd.grad(logits[:, c].sum(), activations, retain_graph=True)[0] for c in range(len(LABELS))]
    layer_cam = torch.stack([(g.clamp(min=0) * activations).sum(1) for g in grads], dim=1).detach()
    grad_cam = torch.stack([(g.mean(dim=(2, 3), keepdim=True) * activations).sum(1) for g in grads], dim=1).detach()
    for method, expected in (("layercam", layer_cam), ("gradcam", grad_cam)):
        _, maps = explain(model, images, CPU, layer=layer, method=method)
        np.testing.assert_allclose(maps, _normalise(expected, 128), atol=1e-4)
    assert all(p.grad is None for p in model.parameters())  # explaining trains nothing


def test_saliency_is_each_logits_input_gradient_smoothed(model, images):
    """Saliency against one backward pass per subtype down to the input, smoothed here with OpenCV's Gaussian."""
    import cv2

    from raysys.explain import SALIENCY_SIGMA

    x = _inputs(images, model, CPU).requires_grad_(True)
    logits = model.network_logits(x)
    sigma = SALIENCY_SIGMA * 128
    radius = max(1, round(3 * sigma))
    expected = np.zeros((3, len(LABELS), 128, 128), np.float32)
    for c in range(len(LABELS)):
        (g,) = torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)
        for b, raw in enumerate(g.abs().sum(1).numpy()):
            expected[b, c] = cv2.GaussianBlur(raw, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT_101)
    expected /= expected.max(axis=(2, 3), keepdims=True)
    probabilities, maps = explain(model, images, CPU)  # the default method
    np.testing.assert_allclose(maps, expected, atol=2e-4)
    np.testing.assert_array_equal(probabilities, infer(model, images, CPU))


def test_png_round_trips():
    from io import BytesIO

    from PIL import Image

    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    decoded = np.asarray(Image.open(BytesIO(png(heat))))
    np.testing.assert_array_equal(decoded, np.round(heat * 255).astype(np.uint8))
    window = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(png(window)))), window)


def test_unknown_layer_or_method_is_refused(model, images):
    with pytest.raises(ValueError, match="method must be one of"):
        explain(model, images, CPU, layer="Conv2d_1a_3x3", method="gradcam")
    with pytest.raises(ValueError, match="saliency reads layer 'input'"):
        explain(model, images, CPU, layer="Mixed_5d", method="saliency")


def test_labels_pick_maps_in_the_order_given(model, images):
    """explain(labels=[...]) equals the matching rows of all six maps; an empty or out-of-range list is refused."""
    _, everything = explain(model, images, CPU)
    _, picked = explain(model, images, CPU, labels=[5, 0, 3])
    assert picked.shape == (len(images), 3) + everything.shape[2:]
    np.testing.assert_allclose(picked, everything[:, [5, 0, 3]], atol=1e-5)
    for bad in ([], [6], [-1]):
        with pytest.raises(ValueError, match="labels must be indices"):
            explain(model, images, CPU, labels=bad)
