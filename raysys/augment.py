"""The recipe's train-side augmentation, twice: albumentations on CPU data workers (the reference), and the
same operations as one batched torch pass on the training device (`raysys.device_augment.DeviceAugment`).

Both read AugmentConfig the same way, apply the operations in the same order and seed each image from
(seed, epoch, image id), so a rerun reproduces every image whatever the batching:

  1. horizontal flip (p = hflip), 2. vertical flip (p = vflip),
  3. rotation about the centre, angle uniform in +/- rotate_limit degrees (p = rotate),
  4. affine: scale uniform in SCALE and shear uniform in SHEAR_DEG, each per axis (p = affine),
  5. elastic deformation, Gaussian-smoothed displacement fields of ELASTIC_SIGMA px scaled by ELASTIC_ALPHA
     (p = elastic),
  6. salt-and-pepper: exactly int(S^2 x salt_pepper_amount) pixels, a SALT_VS_PEPPER share of them 255, the
     rest 0, the same pixels in every channel (p = salt_pepper).

Geometric steps are bilinear with air (0) outside the image. Matrices follow albumentations' convention
(pixel centres at integer coordinates, rotation and shear about ((W - 1) / 2, (H - 1) / 2)). The two paths
draw their random numbers differently, so they agree in distribution, not pixel for pixel; tests compare
each operation with the same parameters, and the statistics of the draws.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from raysys.config import AugmentConfig

SCALE = (0.9, 1.1)  # affine scale per axis
SHEAR_DEG = (-8.0, 8.0)  # affine shear per axis, degrees
ELASTIC_ALPHA = 30.0  # displacement scale, px
ELASTIC_SIGMA = 6.0  # displacement smoothing, px
SALT_VS_PEPPER = (0.4, 0.6)  # share of salt among the noisy pixels (albumentations' default)
# No torch here: Ray Data's decode, augment and cache tasks import this module, and torch would add ~1.8 s of
# CPU to every worker process they start (the batched torch path is raysys.device_augment).


def build_augment(cfg: AugmentConfig):
    """The albumentations pipeline on (S, S, C) uint8 images: the CPU path and the reference."""
    import cv2

    A = _albumentations()

    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0}
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.Rotate(limit=cfg.rotate_limit, p=cfg.rotate, **border),
            A.Affine(scale=SCALE, shear=SHEAR_DEG, p=cfg.affine, **border),
            A.ElasticTransform(alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA, p=cfg.elastic, **border),
            # On uint8 data, salt is 255 and pepper 0: the extremes of the image's own range.
            A.SaltAndPepper(amount=(cfg.salt_pepper_amount, cfg.salt_pepper_amount), salt_vs_pepper=SALT_VS_PEPPER,
                            p=cfg.salt_pepper),
        ]
    )


def _albumentations():
    """albumentations, imported without its optional torch helpers (albumentations.pytorch, which it imports
    whenever torch is installed): the CPU path never uses them, and torch costs every new data worker process
    ~1.8 s of CPU (2.6 s -> 0.8 s for the import). A None in sys.modules makes that one import fail, which
    albumentations allows for; the entry is removed again, so `import albumentations.pytorch` works later."""
    if "albumentations" in sys.modules or "torch" in sys.modules:
        import albumentations

        return albumentations
    sys.modules["albumentations.pytorch"] = None
    try:
        import albumentations
    finally:
        del sys.modules["albumentations.pytorch"]
    return albumentations


def image_seed(seed: int, epoch: int, image_id: str) -> int:
    """A stable 32-bit seed per (seed, epoch, image): Python's hash() is salted per process."""
    digest = np.frombuffer(image_id.encode(), np.uint8).astype(np.uint64)
    mixed = np.random.SeedSequence([seed, epoch, *digest.tolist()])
    return int(mixed.generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _cpu_pipeline(cfg: AugmentConfig):
    return build_augment(cfg)  # once per process and config, not per batch


def augment_images(images: np.ndarray, seeds, cfg: AugmentConfig) -> np.ndarray:
    """The CPU path on a batch: (B, C, S, S) uint8, one seed per image (see image_seed)."""
    pipeline = _cpu_pipeline(cfg)
    out = np.empty_like(images)
    for i, (image, seed) in enumerate(zip(images, seeds)):
        pipeline.set_random_seed(int(seed))
        out[i] = pipeline(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
    return out
