"""The sequence stage on a real local Ray: embeddings by Ray Data, the BiGRU by Ray Train, predict/evaluate rows."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from raysys.cli import main as cli_main
from raysys.config import Config
from raysys.engine import embed, infer
from raysys.labels import LABELS, read_labels
from raysys.metrics import weighted_log_loss
from raysys.model import load_checkpoint, read_meta
from raysys.predict import evaluate_predictions, predict_folder
from raysys.presets import dicom_to_image
from raysys.sequence import CNN_DIR, SEQUENCE_FILE, file_sha256, load_sequence, score_series
from raysys.synthetic import DENSE_PREVALENCE, PhantomConfig, write_dataset
from raysys.testing import PROCESS_ATOL
from raysys.train import SCORE, fit
from raysys.train_sequence import _shares, fit_sequence, fit_series, prepare_series

pytestmark = pytest.mark.slow
SIZE = 80


def _phantom(out: Path, studies: int, seed: int) -> pd.DataFrame:
    return write_dataset(out, PhantomConfig(studies=studies, slices_per_study=(6, 9), size=96, seed=seed,
                                            prevalence=DENSE_PREVALENCE))


@pytest.fixture(scope="module")
def stages(ray_session, tmp_path_factory):
    """A CNN trained for three short epochs (BatchNorm statistics need a few dozen steps) on a few studies, then
    the sequence stage on other studies' CNN outputs: embeddings cost no training, so it can see more series."""
    root = tmp_path_factory.mktemp("sequence")
    _phantom(root / "cnn", studies=10, seed=11)
    _phantom(root / "train", studies=30, seed=12)
    held_out = _phantom(root / "held-out", studies=10, seed=13)
    cfg = Config().replace(**{
        "data.data": str(root / "cnn" / "dicoms"), "data.labels": str(root / "cnn" / "labels.csv"),
        "data.image_size": SIZE, "data.val_fraction": 0.3, "data.seed": 2, "model.weights": "none",
        "train.epochs": 3, "train.batch_size": 4, "train.workers": 1, "train.lr": 1e-3,
        "train.storage_path": str(root / "runs"), "train.name": "cnn",
        "sequence.epochs": 12, "sequence.lr": 3e-3, "sequence.batch_size": 4,
    })
    cnn = fit(cfg)
    seq_cfg = cfg.replace(**{"sequence.cnn": cnn.best_checkpoint, "train.name": "sequence",
                             "data.data": str(root / "train" / "dicoms"), "data.labels": str(root / "train" / "labels.csv")})
    seq = fit_sequence(seq_cfg)
    return {"root": root, "cnn": cnn, "seq": seq, "held_out": held_out, "cfg": seq_cfg}


def _order(paths) -> list[str]:
    """Independent slice order: each file's series, then the InstanceNumber the phantom wrote it with."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    keyed = sorted(zip(headers, paths), key=lambda hp: (str(hp[0].SeriesInstanceUID), int(hp[0].InstanceNumber)))
    return [p for _, p in keyed]


def _expected(checkpoint: str, paths) -> tuple[dict, dict]:
    """Sequence and CNN probabilities per image id, computed here: decode, embed, GRU over each series in order."""
    stage = load_sequence(checkpoint)
    device = torch.device("cpu")
    width = stage.meta["sequence"]["features"]
    seq, cnn = {}, {}
    by_series: dict[str, list] = {}
    for path in _order(paths):
        series = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        by_series.setdefault(series, []).append(path)
    for members in by_series.values():
        decoded = [dicom_to_image(p, stage.meta["windows"], stage.meta["image_size"]) for p in members]
        images = np.stack([image for image, _ in decoded])
        features, logits = embed(stage.cnn.model, images, device)
        features = features.astype(np.float16).astype(np.float32)  # embeddings are kept as float16 (half the memory)
        probabilities = score_series(stage.model, [{"features": features[:, :width], "cnn_logits": logits}], device)[0]
        direct = infer(stage.cnn.model, images, device)
        for (_, meta), p, d in zip(decoded, probabilities, direct):
            seq[meta.image_id], cnn[meta.image_id] = p, d
    return seq, cnn


def test_sequence_run_exports_both_stages_and_beats_its_cnn_on_validation(stages):
    seq, cnn = stages["seq"], stages["cnn"]
    best = Path(seq.best_checkpoint)
    meta = read_meta(best)
    assert meta["stage"] == "sequence" and meta["cnn"]["dir"] == CNN_DIR
    assert meta["cnn"]["source"] == cnn.best_checkpoint
    assert meta["cnn"]["sha256"] == file_sha256(str(best / CNN_DIR / "model.pt"))  # the copy is what it names
    assert (best / SEQUENCE_FILE).is_file() and meta["windows"] == read_meta(cnn.best_checkpoint)["windows"]
    history = pd.read_csv(Path(seq.run_dir) / "metrics.csv")
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    # Every epoch of 12, or until 5 (sequence.patience) passed without a better score; never stopped sooner.
    scores = list(history[SCORE])
    since_best = [n - 1 - int(np.argmin(scores[:n])) for n in range(1, len(scores) + 1)]
    assert max(since_best[:-1], default=0) < 5 and (len(scores) == 12 or since_best[-1] == 5)
    split = pd.read_csv(Path(seq.run_dir) / "split.csv")
    assert not set(split.loc[split["split"] == "val", "patient"]) & set(split.loc[split["split"] == "train", "patient"])
    val = split[split["split"] == "val"]
    root = stages["root"] / "train" / "dicoms"
    paths = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in root.rglob("*.dcm")}
    model = load_checkpoint(cnn.best_checkpoint).model
    images = np.stack([dicom_to_image(paths[i], meta["windows"], meta["image_size"])[0] for i in val["image_id"]])
    cnn_score = weighted_log_loss(val[list(LABELS)].to_numpy(), infer(model, images, torch.device("cpu")))
    assert seq.best_metrics[SCORE] < cnn_score
    assert history[SCORE].min() == pytest.approx(seq.best_metrics[SCORE])


def test_predict_scores_each_series_in_order_and_keeps_one_row_per_image(stages, tmp_path):
    data = tmp_path / "dicoms"
    shutil.copytree(stages["root"] / "held-out" / "dicoms", data)
    files = sorted(data.rglob("*.dcm"))
    broken = files[len(files) // 2]  # a slice inside a series: the rest of its series is still scored
    broken.write_bytes(broken.read_bytes()[:300])
    good = [p for p in files if p != broken]
    checkpoint = stages["seq"].best_checkpoint
    preds = predict_folder(checkpoint, str(data), run_dir=str(tmp_path / "predict"), progress=False)
    seq, cnn = _expected(checkpoint, good)
    assert sorted(preds.frame["image_id"]) == sorted(seq)  # one row per readable image, none padded or lost
    frame = preds.frame.set_index("image_id")
    np.testing.assert_allclose(np.stack([seq[i] for i in frame.index]), frame[list(LABELS)].to_numpy(), atol=PROCESS_ATOL)
    cnn_frame = preds.cnn_frame.set_index("image_id").loc[frame.index]
    np.testing.assert_allclose(np.stack([cnn[i] for i in frame.index]), cnn_frame[list(LABELS)].to_numpy(), atol=PROCESS_ATOL)
    assert not np.allclose(frame[list(LABELS)].to_numpy(), cnn_frame[list(LABELS)].to_numpy(), atol=1e-3)
    errors = pd.read_csv(tmp_path / "predict" / "errors.csv")
    assert list(errors["path"]) == [str(broken)]


def test_evaluate_reports_the_sequence_stage_beside_its_cnn_and_beats_it_on_held_out_studies(stages, tmp_path):
    checkpoint = stages["seq"].best_checkpoint
    held_out = stages["root"] / "held-out"
    preds = predict_folder(checkpoint, str(held_out / "dicoms"), progress=False)
    metrics = evaluate_predictions(preds, str(held_out / "labels.csv"), checkpoint, str(tmp_path))
    truth = read_labels(str(held_out / "labels.csv"))
    seq, cnn = _expected(checkpoint, sorted((held_out / "dicoms").rglob("*.dcm")))
    ids = sorted(seq)
    y = truth.loc[ids, list(LABELS)].to_numpy()
    want_seq = weighted_log_loss(y, np.stack([seq[i] for i in ids]))
    want_cnn = weighted_log_loss(y, np.stack([cnn[i] for i in ids]))
    assert metrics["weighted_log_loss"] == pytest.approx(want_seq, rel=1e-4)
    assert metrics["cnn"]["weighted_log_loss"] == pytest.approx(want_cnn, rel=1e-4)
    assert metrics["sequence_vs_cnn"] == pytest.approx(want_seq / want_cnn, rel=1e-4)
    assert want_seq < want_cnn  # the context stage learned something the CNN alone does not know


def test_a_sequence_checkpoint_refuses_a_cnn_that_changed(stages, tmp_path):
    copy = tmp_path / "best"
    shutil.copytree(stages["seq"].best_checkpoint, copy)
    weights = copy / CNN_DIR / "model.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="changed since the sequence stage was trained"):
        load_sequence(copy)


def test_cli_needs_the_cnn_checkpoint(stages, caplog):
    cfg = stages["cfg"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train-sequence", "--data", cfg.data.data, "--labels", cfg.data.labels])
    assert exit_info.value.code == 1 and "missing --checkpoint" in caplog.text
    with pytest.raises(SystemExit) as exit_info:  # a sequence checkpoint is not a CNN to embed with
        cli_main(["train-sequence", "--checkpoint", stages["seq"].best_checkpoint, "--data", cfg.data.data,
                  "--labels", cfg.data.labels, "--storage-path", str(stages["root"] / "runs"), "--name", "again"])
    assert exit_info.value.code == 1


def test_tune_sweeps_the_sequence_stage_and_exports_the_best_with_its_cnn(stages, tmp_path):
    from raysys.tune import sweep

    cfg = stages["cfg"].replace(**{"sweep.storage_path": str(tmp_path), "sweep.name": "seq-sweep",
                                   "sweep.num_samples": 2, "sweep.max_epochs": 4, "sweep.grace_period": 4,
                                   "sweep.lr_min": 1e-3, "sweep.lr_max": 1e-2})
    result = sweep(cfg, stage="sequence")
    trials = pd.read_csv(Path(result.sweep_dir) / "trials.csv")
    assert len(trials) == 2 and trials["lr"].between(1e-3, 1e-2).all() and (trials["epochs_run"] == 4).all()
    assert trials["lr"].nunique() == 2  # each trial trained with its own draw
    best = Path(result.best_dir)
    meta = read_meta(best)
    assert meta["stage"] == "sequence" and (best / CNN_DIR / "model.pt").is_file()
    assert meta["metrics"][SCORE] == pytest.approx(trials[f"best_{SCORE}"].min())
    for trial in trials["trial"]:  # every trial trained its own GRU on the shared embeddings
        history = pd.read_csv(Path(result.sweep_dir) / "trials" / trial / "metrics.csv")
        assert list(history["epoch"]) == [1, 2, 3, 4]
    load_sequence(best)  # self-contained: loads with its CNN


@pytest.fixture(scope="module")
def series(stages):
    """The sequence stage's input (split, embeddings, series) for the fixture's data, computed once."""
    return prepare_series(stages["cfg"])


def test_a_run_stops_once_its_patience_is_spent_and_a_relaunch_trains_no_more(stages, series):
    cfg = stages["cfg"].replace(**{"train.name": "patience", "sequence.patience": 1, "sequence.lr": 3e-2})
    first = fit_series(cfg, series)
    history = pd.read_csv(Path(first.run_dir) / "metrics.csv")
    scores = list(history[SCORE])
    best = int(np.argmin(scores))
    assert len(scores) < 12 and best == len(scores) - 2  # stopped one epoch after its best, the first to be no better
    assert first.best_metrics["epoch"] == best + 1
    again = fit_series(cfg, series)  # the same name: Train resumes from the run's last checkpoint, with nothing to do
    assert len(pd.read_csv(Path(again.run_dir) / "metrics.csv")) == len(scores)
    assert again.best_metrics[SCORE] == pytest.approx(first.best_metrics[SCORE])


def test_training_series_are_dealt_in_equal_shares(ray_session):
    """DDP's workers must take the same number of steps: 7 series over 3 workers are dealt 3 + 2 + 2, and each
    share one short repeats the first series."""
    import ray

    items = [{"features": np.full((n, 4), n, np.float16), "cnn_logits": np.zeros((n, 6), np.float32),
              "label": np.zeros((n, 6), np.float32), "series": f"s{n}"} for n in range(1, 8)]
    shares = [ray.get(ref) for ref in _shares(items, features=True, workers=3)]
    assert [[len(item["label"]) for item in share] for share in shares] == [[1, 4, 7], [2, 5, 1], [3, 6, 1]]
    assert all(set(item) == {"features", "cnn_logits", "label"} for share in shares for item in share)
    (alone,) = [ray.get(ref) for ref in _shares(items, features=False, workers=1)]
    assert [len(item["label"]) for item in alone] == list(range(1, 8)) and "features" not in alone[0]


def test_two_workers_train_the_stage_in_lockstep(stages, series):
    """Ray Train's data-parallel GRU on two workers, one series per step: unequal shares would hang DDP."""
    cfg = stages["cfg"].replace(**{"train.name": "two-workers", "train.workers": 2, "train.cpus_per_worker": 0.5,
                                   "sequence.epochs": 2, "sequence.batch_size": 1})
    assert len(series.train) % 2 == 1  # an odd count: the second share repeats a series to keep step with the first
    result = fit_series(cfg, series, export=False)
    history = pd.read_csv(Path(result.run_dir) / "metrics.csv")
    assert list(history["epoch"]) == [1, 2] and np.isfinite(history[SCORE]).all()
    # rank 0 reports its own slices: the first, third, ... training series, not all of them
    assert list(history["train_slices"]) == [sum(len(item["label"]) for item in series.train[0::2])] * 2
