"""raysys.device_augment: the batched torch augmentation against albumentations (the CPU path and the reference), on CPU."""

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from raysys.augment import ELASTIC_ALPHA, ELASTIC_SIGMA, SALT_VS_PEPPER, augment_images, build_augment
from raysys.config import AugmentConfig
from raysys.device_augment import DeviceAugment, draw

SIZE = 64
OFF = AugmentConfig(hflip=0, vflip=0, rotate=0, affine=0, elastic=0, salt_pepper=0)


@pytest.fixture(scope="module")
def image():
    """A smooth (C, S, S) uint8 image with structure everywhere, so misplaced pixels show."""
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 2).transpose(2, 0, 1).copy()


def _ours(image, **chosen):
    """The device path on one image with chosen parameters (every other step off)."""
    d = draw(OFF, [0])
    for name, value in chosen.items():
        getattr(d, name)[0] = value
    return DeviceAugment(OFF, SIZE).apply(torch.from_numpy(image[None]), d)[0].numpy()


def _albumentations(transform, image):
    return transform(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)


def test_flips_rotation_and_affine_with_the_same_parameters_equal_albumentations(image):
    import albumentations as A

    assert np.array_equal(_ours(image, hflip=True), image[:, :, ::-1])
    assert np.array_equal(_ours(image, vflip=True), image[:, ::-1, :])
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "p": 1}
    for angle in (9.5, -4.0):
        ref = _albumentations(A.Rotate(limit=(angle, angle), **border), image)
        assert np.abs(_ours(image, angle=angle).astype(int) - ref).max() <= 1, angle
        assert np.abs(image.astype(int) - ref).mean() > 5  # the comparison can fail: rotation moves pixels
    scale, shear = np.array([1.07, 0.92]), np.array([6.0, -3.5])
    ref = _albumentations(A.Affine(scale={"x": (scale[0],) * 2, "y": (scale[1],) * 2},
                                   shear={"x": (shear[0],) * 2, "y": (shear[1],) * 2}, **border), image)
    assert np.abs(_ours(image, scale=scale, shear=shear).astype(int) - ref).max() <= 1


def test_draws_follow_the_config():
    cfg = AugmentConfig(hflip=0.5, vflip=0.25, rotate=0.5, rotate_limit=10, affine=0.3, elastic=0.1, salt_pepper=0.2)
    d = draw(cfg, range(4000))
    for rate, p in ((d.hflip.mean(), 0.5), (d.vflip.mean(), 0.25), ((d.angle != 0).mean(), 0.5),
                    ((d.scale != 1).any(1).mean(), 0.3), (d.elastic.mean(), 0.1), (d.noise.mean(), 0.2)):
        assert rate == pytest.approx(p, abs=0.03)
    angles = d.angle[d.angle != 0]
    assert np.abs(angles).max() <= 10 and np.abs(angles).max() > 9.8 and abs(angles.mean()) < 0.5
    assert ((d.scale >= 0.9) & (d.scale <= 1.1)).all() and (np.abs(d.shear) <= 8).all()
    assert ((d.salt_share >= SALT_VS_PEPPER[0]) & (d.salt_share <= SALT_VS_PEPPER[1])).all()
    # Turning one step off leaves every other draw as it was.
    fewer = draw(AugmentConfig(**{**cfg.__dict__, "rotate": 0.0}), range(4000))
    assert np.array_equal(fewer.hflip, d.hflip) and np.array_equal(fewer.scale, d.scale)


def test_flip_and_noise_rates_and_noise_amounts_agree_with_albumentations(image):
    cfg = AugmentConfig(hflip=0.5, vflip=0, rotate=0, affine=0, elastic=0, salt_pepper=0.3, salt_pepper_amount=0.05)
    n, seeds = 400, np.arange(400)
    ours = DeviceAugment(cfg, SIZE)(torch.from_numpy(np.repeat(image[None], n, 0)), seeds).numpy()
    ref = augment_images(np.repeat(image[None], n, 0), seeds, cfg)
    for out in (ours, ref):
        flipped = np.array([np.abs(o.astype(int) - image[:, :, ::-1]).mean() < np.abs(o.astype(int) - image).mean()
                            for o in out])
        assert flipped.mean() == pytest.approx(0.5, abs=0.07)
        changed = (out != np.where(flipped[:, None, None, None], image[:, :, ::-1], image)).any(1)  # (n, S, S)
        noisy = changed.any((1, 2))
        assert noisy.mean() == pytest.approx(0.3, abs=0.07)
        # Exactly int(S^2 x amount) pixels per noisy image, each 0 or 255 in every channel (a few already were).
        counts = changed[noisy].sum((1, 2))
        assert counts.max() <= int(SIZE * SIZE * 0.05) and counts.mean() > 0.95 * int(SIZE * SIZE * 0.05)
        values = np.moveaxis(out, 1, -1)[changed]
        assert set(np.unique(values)) <= {0, 255} and (values == values[:, :1]).all()


def test_elastic_displacements_have_albumentations_size():
    from albumentations.augmentations.geometric.functional import generate_displacement_fields

    ours = torch.stack([DeviceAugment(OFF, 128)._displacement(seed) for seed in range(20)]).numpy()
    ref = np.stack([np.stack(generate_displacement_fields((128, 128), ELASTIC_ALPHA, ELASTIC_SIGMA, False, (0, 0),
                                                          np.random.default_rng(seed), "gaussian"), -1)
                    for seed in range(20)])
    assert ours.shape == ref.shape
    assert ours.std() == pytest.approx(ref.std(), rel=0.15)
    assert np.percentile(np.abs(ours), 99) == pytest.approx(np.percentile(np.abs(ref), 99), rel=0.2)


def test_device_augment_is_reproducible_and_independent_of_batching(image):
    cfg = AugmentConfig(elastic=0.5, salt_pepper=0.5)
    augment = DeviceAugment(cfg, SIZE)
    batch = torch.from_numpy(np.repeat(image[None], 8, 0))
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    out = augment(batch, seeds)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, augment(batch, seeds))
    alone = torch.cat([augment(batch[i:i + 1], seeds[i:i + 1]) for i in range(8)])
    assert torch.equal(out, alone)
    assert not torch.equal(out, augment(batch, [s + 100 for s in seeds]))  # other seeds, other images


def test_the_albumentations_pipeline_is_the_recipe_in_order_with_each_probability():
    """The reference itself, against the module's documented recipe (not against its own constants)."""
    import cv2

    cfg = AugmentConfig(hflip=0.11, vflip=0.22, rotate=0.33, affine=0.44, elastic=0.55, salt_pepper=0.66,
                        salt_pepper_amount=0.03, rotate_limit=7)
    steps = build_augment(cfg).transforms
    assert [type(t).__name__ for t in steps] == ["HorizontalFlip", "VerticalFlip", "Rotate", "Affine",
                                                 "ElasticTransform", "SaltAndPepper"]
    assert [t.p for t in steps] == [0.11, 0.22, 0.33, 0.44, 0.55, 0.66]
    rotate, affine, elastic, noise = steps[2:]
    assert rotate.limit == (-7, 7)
    assert affine.scale == {"x": (0.9, 1.1), "y": (0.9, 1.1)} and affine.shear == {"x": (-8, 8), "y": (-8, 8)}
    assert (elastic.alpha, elastic.sigma) == (30, 6)
    assert noise.amount == (0.03, 0.03) and noise.salt_vs_pepper == (0.4, 0.6)
    assert all(t.border_mode == cv2.BORDER_CONSTANT and t.fill == 0 for t in (rotate, affine, elastic))  # air outside


def test_cpu_path_is_the_albumentations_pipeline(image):
    cfg = AugmentConfig()
    pipeline = build_augment(cfg)
    pipeline.set_random_seed(5)
    expected = pipeline(image=image.transpose(1, 2, 0))["image"].transpose(2, 0, 1)
    assert np.array_equal(augment_images(image[None], [5], cfg)[0], expected)


def test_data_workers_decode_and_augment_without_importing_torch():
    """Ray Data's tasks import raysys.data and run the CPU path; torch would cost each new worker ~1.8 s."""
    script = """
import sys
import numpy as np
from raysys import data
from raysys.augment import augment_images, image_seed
from raysys.config import AugmentConfig
images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
out = augment_images(images, [image_seed(0, 1, "a"), image_seed(0, 1, "b")], AugmentConfig())
assert out.shape == images.shape and out.dtype == np.uint8
print("torch" in sys.modules)
import albumentations.pytorch  # still importable by whoever wants it
print(albumentations.pytorch.ToTensorV2.__name__)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "ToTensorV2"]
