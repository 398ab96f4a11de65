"""TensorBoard event files (raysys.tracking), read back with TensorBoard's own reader."""

import math
import tempfile

import pytest
from test_train import tensorboard_scalars

from raysys.labels import LABELS
from raysys.tracking import TENSORBOARD_DIR, EpochLog


def _metrics(epoch: int) -> dict:
    return {"epoch": epoch, "train_loss": 1 / epoch, "val_weighted_log_loss": 0.5 / epoch, "lr": 1e-3 * 0.8 ** (epoch - 1),
            "train_images_per_s": 100.0 + epoch, **{f"val_log_loss_{n}": 0.1 * epoch + k for k, n in enumerate(LABELS)},
            **{f"val_auc_{n}": 0.5 + 0.01 * epoch + 0.02 * k for k, n in enumerate(LABELS)}, "val_auc_epidural": math.nan}


@pytest.mark.parametrize("uri", [False, True], ids=["folder", "uri"])
def test_every_epoch_of_every_attempt_is_read_back_once(tmp_path, monkeypatch, uri):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the worker's temp dir: a killed trial leaves it as is
    run = tmp_path / "run"
    run_dir = f"file://{run}" if uri else str(run)  # a URI takes object storage's path (the whole file put again)
    first = EpochLog(run_dir)  # a worker group that fails after epoch 1 never closes its log
    first.write(_metrics(1))
    second = EpochLog(run_dir)  # the restarted group, within the same second
    for epoch in (2, 3):
        second.write(_metrics(epoch))
    assert not list(scratch.iterdir())  # before close(): nothing on the worker's disk for a kill to leave behind
    second.close()
    scalars = tensorboard_scalars(run / TENSORBOARD_DIR)
    assert sorted(scalars["loss/val"]) == [1, 2, 3]
    for epoch in (1, 2, 3):
        expected = _metrics(epoch)
        assert scalars["loss/train"][epoch] == pytest.approx(expected["train_loss"], rel=1e-6)
        assert scalars["lr"][epoch] == pytest.approx(expected["lr"], rel=1e-6)
        assert scalars["speed/images_per_s_per_worker"][epoch] == pytest.approx(expected["train_images_per_s"])
        for n in LABELS:  # each label's value under its own name
            assert scalars[f"val_log_loss/{n}"][epoch] == pytest.approx(expected[f"val_log_loss_{n}"], rel=1e-6)
            if n != "epidural":
                assert scalars[f"val_auc/{n}"][epoch] == pytest.approx(expected[f"val_auc_{n}"], rel=1e-6)
    assert "val_auc/epidural" not in scalars  # NaN (no positive in validation) is left out, not written as NaN
