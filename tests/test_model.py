import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from raysys.engine import WeightedBCE, train_one_epoch, validate
from raysys.labels import LABELS
from raysys.metrics import weighted_log_loss
from raysys.model import WeightsError, build_model, load_backbone, load_checkpoint, save_checkpoint
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


def test_logit_offset_applies_in_eval_mode_only():
    torch.manual_seed(0)
    model = build_model(image_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    model.eval()
    with torch.inference_mode():
        raw = model(x)
        model.logit_offset.copy_(torch.arange(6.0))
        shifted = model(x)
    assert torch.allclose(shifted - raw, torch.arange(6.0).expand(2, 6), atol=1e-5)
    model.train()  # dropout is random in train mode: same seed, same draw
    torch.manual_seed(1)
    raw_train = model.net(x)
    torch.manual_seed(1)
    assert torch.allclose(model(x), raw_train)


def test_size_limits_and_aux_head():
    with pytest.raises(ValueError, match=">= 75"):
        build_model(image_size=64)
    with pytest.raises(ValueError, match="299"):
        build_model(image_size=256, aux_logits=True)
    model = build_model(image_size=299, aux_logits=True).train()
    out = model(torch.zeros(2, 3, 299, 299))
    assert out.logits.shape == (2, 6) and out.aux_logits.shape == (2, 6)


def test_imagenet_download_failure_says_how_to_pass_a_local_file(tmp_path, monkeypatch):
    # An empty torch cache and an unreachable proxy: the download is really attempted and fails, as offline.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(WeightsError, match="--weights /path/to/"):
        load_backbone("imagenet")


def test_local_state_dict_weights_load_and_foreign_files_are_refused(tmp_path):
    torch.manual_seed(1)
    source = build_model(image_size=SIZE)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    torch.save(source.net.state_dict(), tmp_path / "torchvision-style.pth")  # keys without the wrapper's "net."
    model = build_model(load_backbone(str(tmp_path / "w.pth")), image_size=SIZE)
    plain = build_model(load_backbone(str(tmp_path / "torchvision-style.pth")), image_size=SIZE)
    for name in ("net.Conv2d_1a_3x3.conv.weight", "net.Mixed_7c.branch1x1.conv.weight"):
        assert torch.equal(dict(plain.named_parameters())[name], dict(source.named_parameters())[name])
        assert torch.equal(dict(model.named_parameters())[name], dict(source.named_parameters())[name])
    assert load_backbone("none") is None
    with pytest.raises(WeightsError, match="nope.pth: no such file"):
        load_backbone(str(tmp_path / "nope.pth"))
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not an InceptionV3 state dict"):
        load_backbone(str(tmp_path / "other.pth"))
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(WeightsError, match="not a torch state dict"):
        load_backbone(str(tmp_path / "text.pth"))


def test_weighted_bce_equals_the_competition_metric():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(50, 6, generator=g), (torch.rand(50, 6, generator=g) < 0.4).float()
    p = torch.sigmoid(logits).double().numpy()
    weights = np.tile([1, 1, 1, 1, 1, 2], 50)
    expected = log_loss(y.numpy().reshape(-1), p.reshape(-1), sample_weight=weights, labels=[0, 1])
    assert WeightedBCE()(logits, y).item() == pytest.approx(expected, rel=1e-5)


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
    stats = train_one_epoch(model, _batches(), optimizer, WeightedBCE(), device)
    assert stats["train_images"] == 8 and np.isfinite(stats["train_loss"])
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
