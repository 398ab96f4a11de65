import copy
import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch

from raysys.data import balance, balance_logit_offset
from raysys.engine import BF16_MIN_BATCH, WeightedBCE, train_one_epoch, use_amp, validate
from raysys.labels import LABELS
from raysys.metrics import weighted_log_loss
from raysys.model import build_model, load_checkpoint, save_checkpoint, unbalance
from raysys.presets import to_model_input
from raysys.testing import settle_batchnorm

SIZE = 80  # smallest size InceptionV3 accepts comfortably; keeps CPU tests fast


def _batches(n_batches=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        y = (torch.rand(batch, 6, generator=g) < 0.3).float()
        y[:, 5] = y[:, :5].max(dim=1).values
        yield {"image": torch.randint(0, 256, (batch, 3, SIZE, SIZE), dtype=torch.uint8, generator=g), "label": y}


def test_model_outputs_six_logits_and_declares_its_contract():
    torch.manual_seed(0)
    model = build_model(image_size=SIZE).eval()
    out = model(torch.zeros(2, 3, SIZE, SIZE))
    assert out.shape == (2, len(LABELS))
    assert model.contract.size == SIZE and model.contract.channels == 3


def test_unbalance_is_the_probabilities_under_the_training_sets_own_prevalence():
    """p_any = sigmoid(z_any + offset); p_k = sigmoid(z_k) x p_any / sigmoid(z_any), computed here in float64."""
    z = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    for offset in (-2.0, -0.3):
        got = torch.sigmoid(unbalance(z.float(), torch.tensor(offset))).double().numpy()
        p_any = 1 / (1 + np.exp(-(z[:, 5].numpy() + offset)))
        p_subtypes = 1 / (1 + np.exp(-z[:, :5].numpy())) * (p_any * (1 + np.exp(-z[:, 5].numpy())))[:, None]
        np.testing.assert_allclose(got, np.column_stack([p_subtypes, p_any]), atol=1e-6)
    assert torch.equal(unbalance(z.float(), torch.tensor(0.0)), z.float())  # no balancing: the logits as they are
    x = z.float().requires_grad_(True)
    for offset in (0.0, -1.0):  # both branches: finite gradients (the heat maps take them)
        unbalance(x, torch.tensor(offset)).sum().backward()
        assert torch.isfinite(x.grad).all()


def test_a_balanced_sample_corrected_by_unbalance_gives_the_populations_probabilities():
    """balance() itself draws the epoch; per feature value, the epoch's own frequencies through unbalance() come
    back to the population's (a constant shift per label would not: it pulls a sure bleed's subtype down too)."""
    rng = np.random.default_rng(0)
    p_any, p_subdural_if_any = np.array([0.01, 0.05, 0.3, 0.95]), np.array([0.3, 0.5, 0.6, 0.8])
    b = rng.choice(4, 400_000, p=[0.6, 0.2, 0.1, 0.1])  # 14% of slices bleed, as in RSNA
    bleed = rng.random(len(b)) < p_any[b]
    frame = pd.DataFrame({name: 0 for name in LABELS}, index=range(len(b)))
    subdural = bleed & (rng.random(len(b)) < p_subdural_if_any[b])
    frame["any"], frame["subdural"], frame["b"] = bleed.astype(int), subdural.astype(int), b
    epoch = balance(frame, epoch=1, seed=0)
    seen = epoch.groupby("b")[["subdural", "any"]].mean().to_numpy()
    logits = torch.zeros(4, 6, dtype=torch.float64)
    logits[:, [4, 5]] = torch.tensor(np.log(seen / (1 - seen)))
    offset = balance_logit_offset(frame)[LABELS.index("any")]
    got = torch.sigmoid(unbalance(logits, torch.tensor(offset))).numpy()
    np.testing.assert_allclose(got[:, 5], p_any, rtol=0.05)
    np.testing.assert_allclose(got[:, 4], p_any * p_subdural_if_any, rtol=0.05)
    constant = 1 / (1 + np.exp(-(logits[:, 4].numpy() + balance_logit_offset(frame)[4])))
    assert constant[3] < 0.95 * 0.8 - 0.2  # the per-label shift it replaces: 0.44 for the surest bleeds' 0.76


def test_eval_mode_applies_unbalance_with_the_any_offset_and_train_mode_does_not():
    torch.manual_seed(0)
    model = build_model(image_size=SIZE).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        raw = model(x)
        model.logit_offset.copy_(torch.tensor([0.4, 0.4, 0.4, 0.4, 0.4, -1.5]))  # the subtypes' entries are not used
        assert torch.equal(model(x), unbalance(raw, torch.tensor(-1.5)))
        torch.manual_seed(1)
        trained = model.train()(x)
        model.logit_offset.zero_()
        torch.manual_seed(1)
        assert torch.equal(trained, model(x))  # train mode: the raw logits, whatever the offset


def test_to_model_input_normalises_per_channel():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 3, 1, 1)
    x = to_model_input(images, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-1.0, -0.5, 0.0]))
    assert torch.allclose(x[0, :, 0, 1], torch.tensor([1.0, 1.5, 1.0]))


def test_train_one_epoch_then_evaluate_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_model(image_size=SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    late = 0.05  # the data pipeline's delay before each batch and before it ends

    def slow_batches():
        for batch in _batches():
            time.sleep(late)
            yield batch
        time.sleep(late)

    stats = train_one_epoch(model, slow_batches(), optimizer, WeightedBCE(), device)
    assert stats["train_images"] == 8 and np.isfinite(stats["train_loss"])
    # The loop's time blocked on the data: at least the three delays, within the epoch, the first batch's included.
    assert late <= stats["first_batch_seconds"] <= stats["data_wait_seconds"]
    assert 3 * late <= stats["data_wait_seconds"] < stats["train_seconds"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    val = list(_batches(seed=9))
    # Two steps leave BatchNorm's statistics near their start (every probability 0 or 1); the images' own are set.
    settle_batchnorm(model, torch.cat([b["image"] for b in val]).numpy())
    metrics = validate(model, val, device)
    y = torch.cat([b["label"] for b in val]).numpy()
    with torch.inference_mode():
        model.eval()
        p = torch.cat([torch.sigmoid(model(to_model_input(b["image"], model.contract.mean, model.contract.std))) for b in val])
    assert ((p > 1e-3) & (p < 1 - 1e-3)).all()  # so the score depends on every image
    assert metrics["val_weighted_log_loss"] == pytest.approx(weighted_log_loss(y, p.numpy()), rel=1e-5)
    assert set(metrics["val_per_class_auc"]) == set(LABELS)
    assert metrics["val_positives"] == int(y[:, LABELS.index("any")].sum()) > 0 and metrics["val_degenerate"] == 0
    negatives = [{**b, "label": torch.zeros_like(b["label"])} for b in val]
    assert validate(model, negatives, device)["val_degenerate"] == 1  # no bleed: the score only measures negatives

    assert metrics["val_diverged"] == 0

    # A diverged model (NaN weights) scores the worst the clipped metric can give, a finite number: Ray Train keeps
    # checkpoint scores as JSON, and an infinite one read back as null broke the next relaunch of the run.
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.net.fc.weight.fill_(float("nan"))
    diverged = validate(broken, val, device)
    assert diverged["val_diverged"] == 1
    assert diverged["val_weighted_log_loss"] == pytest.approx(math.log(1e15))
    json.dumps({k: v for k, v in diverged.items() if k != "val_per_class_auc"}, allow_nan=False)  # no inf anywhere

    cfg = {"data": {"windows": "brain,subdural,soft_tissue"}}
    save_checkpoint(tmp_path / "ck", model, config=cfg, epoch=3, metrics=metrics, optimizer=optimizer)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.meta["epoch"] == 3 and loaded.meta["labels"] == list(LABELS) and loaded.meta["image_size"] == SIZE
    saved = model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.model.state_dict().items())
    # The loader's model runs channels_last (raysys.engine); the same layout here gives the same numbers.
    x = to_model_input(val[0]["image"], model.contract.mean, model.contract.std).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(loaded.model(x), model.to(memory_format=torch.channels_last)(x), atol=1e-6)


def test_a_last_batch_of_one_image_is_skipped_not_fatal():
    # BatchNorm cannot train on a single image; an epoch whose shard leaves one image over must go on.
    torch.manual_seed(0)
    model = build_model(image_size=SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = list(_batches())
    single = {"image": batches[0]["image"][:1], "label": batches[0]["label"][:1]}
    stats = train_one_epoch(model, [*batches, single], optimizer, WeightedBCE(), torch.device("cpu"))
    assert stats["train_images"] == sum(len(b["label"]) for b in batches)
    assert stats["train_skipped_batches"] == 1


def test_the_epochs_train_loss_is_the_image_weighted_mean_of_its_steps_losses():
    # train_one_epoch sums the loss on the device and reads it once; a plain loop reading every step's loss
    # (batches of 4, 4 and 3 images: the weights matter) must give the same mean.
    batches = [*_batches(), *_batches(n_batches=1, batch=3, seed=4)]
    torch.manual_seed(0)
    model = build_model(image_size=SIZE)
    twin = copy.deepcopy(model)
    torch.manual_seed(7)  # dropout
    stats = train_one_epoch(model, batches, torch.optim.Adam(model.parameters(), lr=1e-3), WeightedBCE(),
                            torch.device("cpu"))
    optimizer, loss_fn, losses = torch.optim.Adam(twin.parameters(), lr=1e-3), WeightedBCE(), []
    twin.train()
    torch.manual_seed(7)
    for b in batches:
        x = to_model_input(b["image"], twin.contract.mean, twin.contract.std).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(twin(x), b["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert stats["train_images"] == 11
    assert stats["train_loss"] == pytest.approx((4 * losses[0] + 4 * losses[1] + 3 * losses[2]) / 11, rel=1e-5)


def test_device_augmentation_runs_inside_the_training_step():
    from raysys.config import AugmentConfig
    from raysys.device_augment import DeviceAugment

    seen = []

    def augment(images, seeds):
        seen.append(list(seeds))
        return DeviceAugment(AugmentConfig(), SIZE)(images, seeds)

    torch.manual_seed(0)
    model = build_model(image_size=SIZE)
    batches = [{**b, "aug_seed": torch.arange(4) + 10 * k} for k, b in enumerate(_batches())]
    stats = train_one_epoch(model, batches, torch.optim.Adam(model.parameters()), WeightedBCE(), torch.device("cpu"),
                            augment=augment)
    assert seen == [[0, 1, 2, 3], [10, 11, 12, 13]] and stats["train_images"] == 8


def test_auto_precision_trains_in_bf16_only_at_the_batches_where_an_h200_measured_it_faster():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert BF16_MIN_BATCH > 64  # fp32 (TF32) + channels_last trained faster at the recipe's 24 and at 64
    assert not use_amp("auto", cuda, 24) and not use_amp("auto", cuda, 64)
    assert use_amp("auto", cuda, 256) and use_amp("auto", cuda)  # a large training batch; inference (no batch)
    assert not use_amp("auto", cpu, 256) and not use_amp("auto", cpu)
    assert use_amp("bf16", cpu, 24) and not use_amp("off", cuda, 256)
