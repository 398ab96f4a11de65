"""Batch inference and evaluation on a real local Ray with phantom DICOMs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from raysys.config import Config, InferenceConfig
from raysys.engine import infer
from raysys.labels import LABELS, read_labels
from raysys.metrics import per_class_auc, weighted_log_loss
from raysys.model import load_checkpoint, save_checkpoint
from raysys.predict import evaluate_predictions, predict_folder, submission
from raysys.presets import dicom_to_image
from raysys.synthetic import PhantomConfig, write_dataset
from raysys.testing import PROCESS_ATOL, untrained_cnn

SIZE = 80


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    frame = write_dataset(root / "data", PhantomConfig(studies=3, slices_per_study=(5, 6), size=128, seed=4,
                                                       quirks=True, quirk_files=1))
    model = untrained_cnn(frame.loc[frame["quirk"] != "truncated", "path"], SIZE)
    model.logit_offset.copy_(torch.tensor([-3.0, -2, -2, -2, -2, -1]))
    ck = save_checkpoint(root / "ck", model, config=Config().replace(**{"data.image_size": SIZE}).to_dict(), epoch=1,
                         metrics={}, extra_meta={"label_prior": [0.01, 0.05, 0.04, 0.05, 0.06, 0.14]})
    return root, frame, str(ck)


@pytest.fixture(scope="module")
def preds(ray_session, setup):
    root, _, ck = setup
    return predict_folder(ck, str(root / "data" / "dicoms"), InferenceConfig(batch_size=4, actors=1), progress=False)


def test_one_row_per_readable_image_equal_to_calling_the_model(setup, preds):
    _, frame, ck = setup
    truncated = frame.index[frame["quirk"] == "truncated"]
    readable = frame.drop(index=truncated)
    assert sorted(preds.frame["image_id"]) == sorted(readable.index)  # no padded, dropped or repeated rows
    assert list(preds.errors["image_id"]) == list(truncated)
    model = load_checkpoint(ck).model
    directs = []
    for image_id, row in readable.iloc[:5].iterrows():
        image, _ = dicom_to_image(row["path"], "brain,subdural,soft_tissue", SIZE)
        directs.append(infer(model, image[None], torch.device("cpu"))[0])
        got = preds.frame.set_index("image_id").loc[image_id, list(LABELS)].to_numpy(np.float64)
        assert np.allclose(got, directs[-1], atol=PROCESS_ATOL)
    # The check can fail: a row holding another image's answer would be more than 10 x the tolerance off.
    assert min(np.abs(a - b).max() for i, a in enumerate(directs) for b in directs[i + 1:]) > 10 * PROCESS_ATOL
    probs = preds.frame[list(LABELS)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all()


def test_submission_follows_the_sample_and_refuses_missing_images(setup, preds, tmp_path):
    root, frame, ck = setup
    readable = [i for i in frame.index if i not in set(preds.errors["image_id"])]
    order = list(np.random.default_rng(0).permutation(readable))
    sample = pd.DataFrame({"ID": [f"{i}_{n}" for i in order for n in LABELS], "Label": 0.5})
    sample.to_csv(tmp_path / "sample.csv", index=False)
    out = submission(preds, tmp_path / "sub.csv", checkpoint=ck, sample_submission=str(tmp_path / "sample.csv"))
    written = pd.read_csv(tmp_path / "sub.csv")
    assert len(written) == 6 * len(readable) == len(out)
    assert written["ID"].tolist() == sample["ID"].tolist()
    assert written["Label"].between(0, 1).all()

    # The truncated image and one that is nowhere in the data are in the sample: listed in errors.csv (the
    # scan's columns), and an error unless allowed.
    everyone = pd.DataFrame({"ID": [f"{i}_{n}" for i in [*frame.index, "ID_nowhere"] for n in LABELS], "Label": 0.5})
    everyone.to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(RuntimeError, match="--allow-missing"):
        submission(preds, tmp_path / "sub2.csv", checkpoint=ck, sample_submission=str(tmp_path / "all.csv"))
    errors = pd.read_csv(tmp_path / "errors.csv", keep_default_na=False)
    truncated = frame.index[frame["quirk"] == "truncated"][0]
    assert list(errors.columns) == ["image_id", "path", "reason"]
    assert errors["image_id"].tolist() == [truncated, "ID_nowhere"] and "cut short" in errors["reason"].iloc[0]
    assert errors["path"].tolist() == [frame.loc[truncated, "path"], ""]
    assert errors["reason"].iloc[1] == "not found in the data"
    filled = submission(preds, tmp_path / "sub3.csv", checkpoint=ck, sample_submission=str(tmp_path / "all.csv"),
                        allow_missing=True)
    for image_id in (truncated, "ID_nowhere"):
        rows = filled.set_index("ID").loc[[f"{image_id}_{n}" for n in LABELS], "Label"]
        assert np.allclose(rows, [0.01, 0.05, 0.04, 0.05, 0.06, 0.14])


def test_the_predict_command_lists_unreadable_files_beside_its_submission(setup, tmp_path):
    """`raysys predict` without a sample: one submission row per readable image and label, and errors.csv beside it."""
    from raysys.cli import main as cli_main

    root, frame, ck = setup
    out = tmp_path / "out" / "submission.csv"
    cli_main(["predict", "--checkpoint", ck, "--data", str(root / "data" / "dicoms"), "--out", str(out),
              "--batch-size", "4", "--actors", "1"])
    truncated = frame.index[frame["quirk"] == "truncated"]
    errors = pd.read_csv(out.parent / "errors.csv")
    assert errors["image_id"].tolist() == list(truncated) and errors["path"].tolist() == list(frame.loc[truncated, "path"])
    written = pd.read_csv(out)
    assert sorted(written["ID"]) == sorted(f"{i}_{n}" for i in frame.drop(index=truncated).index for n in LABELS)


def test_evaluate_matches_the_metrics_module(setup, preds, tmp_path):
    root, _, ck = setup
    metrics = evaluate_predictions(preds, str(root / "data" / "labels.csv"), ck, str(tmp_path))
    table = read_labels(root / "data" / "labels.csv")
    ids = preds.frame["image_id"]
    y = table.loc[ids, list(LABELS)].to_numpy(float)
    p = preds.frame[list(LABELS)].to_numpy(float)
    assert metrics["weighted_log_loss"] == pytest.approx(weighted_log_loss(y, p))
    prior = np.tile([0.01, 0.05, 0.04, 0.05, 0.06, 0.14], (len(y), 1))
    assert metrics["prior_weighted_log_loss"] == pytest.approx(weighted_log_loss(y, prior))
    auc = per_class_auc(y, p)
    for name in LABELS:
        got = metrics["per_class_auc"][name]
        assert (np.isnan(auc[name]) and np.isnan(got)) or auc[name] == pytest.approx(got)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_images"] == len(y)
    assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "calibration.png").stat().st_size > 0
