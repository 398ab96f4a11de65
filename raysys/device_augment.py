"""The batched torch path of the recipe's augmentation (see raysys.augment for the operations, their order,
parameters and seeding): `DeviceAugment` runs them on the training device, one batch at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from raysys.augment import ELASTIC_ALPHA, ELASTIC_SIGMA, SALT_VS_PEPPER, SCALE, SHEAR_DEG
from raysys.config import AugmentConfig


@dataclass(frozen=True)
class Draws:
    """What the device path drew for each image of a batch (B = batch size); zero where a step is off."""

    hflip: np.ndarray  # (B,) bool
    vflip: np.ndarray  # (B,) bool
    angle: np.ndarray  # (B,) degrees
    scale: np.ndarray  # (B, 2) x, y
    shear: np.ndarray  # (B, 2) degrees, x, y
    elastic: np.ndarray  # (B,) bool
    noise: np.ndarray  # (B,) bool
    salt_share: np.ndarray  # (B,)
    field_seed: np.ndarray  # (B,) int64: the elastic fields' and noise positions' generator seed


def draw(cfg: AugmentConfig, seeds) -> Draws:
    """Each image's parameters from its own seed. Every number is drawn whether its step is on or not,
    so turning one step off leaves the draws of the others unchanged."""
    n = len(seeds)
    d = Draws(hflip=np.zeros(n, bool), vflip=np.zeros(n, bool), angle=np.zeros(n), scale=np.ones((n, 2)),
              shear=np.zeros((n, 2)), elastic=np.zeros(n, bool), noise=np.zeros(n, bool), salt_share=np.zeros(n),
              field_seed=np.zeros(n, np.int64))
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        u, angle = rng.random(6), rng.uniform(-cfg.rotate_limit, cfg.rotate_limit)
        scale, shear = rng.uniform(*SCALE, 2), rng.uniform(*SHEAR_DEG, 2)
        d.hflip[i], d.vflip[i], d.elastic[i], d.noise[i] = (u[0] < cfg.hflip, u[1] < cfg.vflip, u[4] < cfg.elastic,
                                                            u[5] < cfg.salt_pepper)
        if u[2] < cfg.rotate:
            d.angle[i] = angle
        if u[3] < cfg.affine:
            d.scale[i], d.shear[i] = scale, shear
        d.salt_share[i], d.field_seed[i] = rng.uniform(*SALT_VS_PEPPER), rng.integers(2**62)
    return d


def forward_matrices(d: Draws, size: int) -> np.ndarray:
    """(B, 3, 3) maps from input to output pixel coordinates: affine @ rotation @ vflip @ hflip."""
    b, last, c = len(d.angle), size - 1.0, (size - 1) / 2.0
    shift, unshift = np.eye(3), np.eye(3)
    shift[:2, 2], unshift[:2, 2] = -c, c
    out = np.empty((b, 3, 3))
    for i in range(b):
        flip = np.diag([-1.0 if d.hflip[i] else 1.0, -1.0 if d.vflip[i] else 1.0, 1.0])
        flip[0, 2], flip[1, 2] = (last if d.hflip[i] else 0.0), (last if d.vflip[i] else 0.0)
        a = math.radians(d.angle[i])
        rotate = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
        # albumentations negates its shear draw; the distribution is symmetric, the matrix is the same form
        sx, sy = (math.tan(math.radians(-s)) for s in d.shear[i])
        affine = np.array([[1, sx, 0], [sy, 1, 0], [0, 0, 1]]) @ np.diag([*d.scale[i], 1.0])
        out[i] = (unshift @ affine @ shift) @ (unshift @ rotate @ shift) @ flip
    return out


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    taps = int(round(sigma * 4 * 2 + 1)) | 1  # OpenCV's automatic size for float images: 49 taps at sigma 6
    x = torch.arange(taps, dtype=torch.float32, device=device) - taps // 2
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class DeviceAugment:
    """The recipe's augmentation as batched torch ops on `device`: (B, C, S, S) uint8 in, the same out.

    One grid_sample per batch does every geometric step (flips, rotation, affine and the elastic
    displacement, composed into one sampling grid); salt-and-pepper is one scatter. Per image, the
    parameters come from `draw` (numpy, seeded by the image's seed) and the elastic fields and noise
    positions from a torch generator seeded from those draws, on the same device.
    """

    def __init__(self, cfg: AugmentConfig, size: int, device: torch.device | str = "cpu"):
        self.cfg, self.size, self.device = cfg, size, torch.device(device)
        axis = torch.arange(size, dtype=torch.float32, device=self.device)
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        self.pixels = torch.stack([x, y, torch.ones_like(x)], -1)  # (S, S, 3) homogeneous output coordinates
        self.kernel = _gaussian_kernel(ELASTIC_SIGMA, self.device)

    def __call__(self, images: torch.Tensor, seeds) -> torch.Tensor:
        d = draw(self.cfg, [int(s) for s in seeds])
        return self.apply(images, d)

    def apply(self, images: torch.Tensor, d: Draws) -> torch.Tensor:
        """Augment with given draws (tests pass chosen parameters here)."""
        images = images.to(self.device)
        s = self.size
        geometric = d.hflip | d.vflip | (d.angle != 0) | (d.scale != 1).any(1) | (d.shear != 0).any(1) | d.elastic
        out = images.clone()
        rows = np.flatnonzero(geometric)
        if len(rows):
            inverse = np.linalg.inv(forward_matrices(d, s)[rows])[:, :2]  # output pixel -> input pixel
            theta = torch.as_tensor(inverse, dtype=torch.float32, device=self.device)
            points = self.pixels.expand(len(rows), s, s, 3).clone()
            for j, i in enumerate(rows):
                if d.elastic[i]:
                    points[j, ..., :2] += self._displacement(int(d.field_seed[i]))
            source = torch.einsum("bij,bhwj->bhwi", theta, points)  # (n, S, S, 2) input pixel coordinates
            grid = (2 * source + 1) / s - 1  # pixel centres -> grid_sample's [-1, 1] (align_corners=False)
            warped = F.grid_sample(images[rows].float(), grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False)
            out[torch.as_tensor(rows, device=self.device)] = warped.round_().clamp_(0, 255).to(torch.uint8)
        for i in np.flatnonzero(d.noise):
            self._salt_and_pepper(out[i], float(d.salt_share[i]), int(d.field_seed[i]))
        return out

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def _displacement(self, seed: int) -> torch.Tensor:
        """(S, S, 2) elastic displacement in px: N(0, 1) fields scaled to max |1|, blurred, times alpha."""
        s = self.size
        fields = torch.randn((2, 1, s, s), generator=self._generator(seed), device=self.device)
        fields /= fields.abs().max().clamp_min(1e-6)
        k, pad = self.kernel, len(self.kernel) // 2
        fields = F.conv2d(F.pad(fields, (pad, pad, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        fields = F.conv2d(F.pad(fields, (0, 0, pad, pad), mode="replicate"), k.view(1, 1, -1, 1))
        return (fields[:, 0] * ELASTIC_ALPHA).permute(1, 2, 0)  # (S, S, [dx, dy])

    def _salt_and_pepper(self, image: torch.Tensor, salt_share: float, seed: int) -> None:
        area = self.size * self.size
        count = int(area * self.cfg.salt_pepper_amount)
        where = torch.randperm(area, generator=self._generator(seed + 1), device=self.device)[:count]
        salt = int(count * salt_share)
        flat = image.view(image.shape[0], -1)  # the same pixels in every channel
        flat[:, where[:salt]] = 255
        flat[:, where[salt:]] = 0
