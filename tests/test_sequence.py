"""The sequence stage on synthetic series: masking, a neutral start, and learning from neighbouring slices."""

import numpy as np
import pytest
import torch

from raysys.labels import LABELS
from raysys.metrics import weighted_log_loss
from raysys.sequence import SeriesGRU, pad_series, score_series, train_sequence_epoch

FEATURES = 8


def synthetic_series(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Series of 10-40 slices whose bleeds span 3-10 adjacent slices (as the phantom draws them); each slice's
    CNN logits are the truth plus heavy independent noise, so a slice alone is unsure and its neighbours agree."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(10, 41))
        label = np.zeros((length, len(LABELS)), np.float32)
        for subtype in range(len(LABELS) - 1):
            if rng.random() < 0.3:
                span = int(rng.integers(3, 11))
                first = int(rng.integers(0, max(1, length - span)))
                label[first : first + span, subtype] = 1
        label[:, -1] = label[:, :-1].max(axis=1)  # any
        cnn_logits = (3.0 * (2 * label - 1) + rng.normal(0, 3.0, label.shape)).astype(np.float32)
        features = rng.normal(0, 1, (length, FEATURES)).astype(np.float32)
        out.append({"features": features, "cnn_logits": cnn_logits, "label": label})
    return out


def _batches(series, batch_size, rng):
    order = rng.permutation(len(series))
    return [pad_series([series[i] for i in order[s : s + batch_size]]) for s in range(0, len(series), batch_size)]


def test_pad_series_masks_padding():
    series = synthetic_series(3, seed=0)
    batch = pad_series(series)
    lengths = [len(s["features"]) for s in series]
    assert batch["features"].shape == (3, max(lengths), FEATURES) and batch["cnn_logits"].shape == (3, max(lengths), 6)
    assert batch["mask"].sum(dim=1).tolist() == lengths
    for i, s in enumerate(series):
        assert np.array_equal(batch["label"][i, : lengths[i]].numpy(), s["label"])
        assert not batch["features"][i, lengths[i] :].any()


def test_an_untrained_model_scores_as_the_cnn_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = SeriesGRU(FEATURES)
    series = synthetic_series(6, seed=1)
    together = score_series(model, series, torch.device("cpu"))
    for s, p in zip(series, together):
        assert np.allclose(p, 1 / (1 + np.exp(-s["cnn_logits"])), atol=1e-6)  # zero-initialised correction
    # After a training step the correction is no longer zero: a series' scores still must not depend on
    # what it is batched with.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_sequence_epoch(model, [pad_series(series)], optimizer, torch.device("cpu"))
    together = score_series(model, series, torch.device("cpu"))
    alone = [score_series(model, [s], torch.device("cpu"))[0] for s in series]
    for a, b in zip(together, alone):
        assert np.allclose(a, b, atol=1e-5)
    assert not np.allclose(together[0], 1 / (1 + np.exp(-series[0]["cnn_logits"])), atol=1e-3)


def test_context_beats_the_slice_alone_on_held_out_series():
    torch.manual_seed(0)
    train, test = synthetic_series(300, seed=2), synthetic_series(100, seed=3)
    model = SeriesGRU(FEATURES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    losses = [train_sequence_epoch(model, _batches(train, 32, rng), optimizer, torch.device("cpu"))["train_loss"]
              for _ in range(12)]
    assert losses[-1] < losses[0]
    labels = np.concatenate([s["label"] for s in test])
    cnn = 1 / (1 + np.exp(-np.concatenate([s["cnn_logits"] for s in test])))
    gru = np.concatenate(score_series(model, test, torch.device("cpu")))
    cnn_loss, gru_loss = weighted_log_loss(labels, cnn), weighted_log_loss(labels, gru)
    assert gru_loss <= 0.8 * cnn_loss, (gru_loss, cnn_loss)  # the bar for the sequence stage


@pytest.mark.parametrize("length", [1, 2])
def test_very_short_series(length):
    torch.manual_seed(0)
    model = SeriesGRU(FEATURES)
    series = [{k: v[:length] for k, v in s.items()} for s in synthetic_series(2, seed=4)]
    out = score_series(model, series, torch.device("cpu"))
    assert [p.shape for p in out] == [(length, 6)] * 2 and all(np.isfinite(p).all() for p in out)


@pytest.mark.parametrize(("workers", "cpus", "gpus", "cluster", "node", "expected", "per_actor", "threads"), [
    (2, 0.5, 0, 2, 2, 2, 0.875, 1),  # the defaults: two actors share what one decode task leaves
    (2, 1.0, 0, 2, 2, 1, 1.75, 2),  # two whole-CPU actors would hold both CPUs and nothing would decode (it hung)
    (4, 0.25, 0, 2, 2, 3, 1.75 / 3, 1),  # at least half a CPU each: 3 actors and 0.25 for decoding
    (1, 2.0, 0, 2, 2, 1, 2.0, 2),  # one actor always, even where the cluster is too small (Ray then says it waits)
    (2, 1.0, 1, 2, 2, 2, 1.0, 1),  # GPU actors hold no CPU the decode tasks need
    (2, 1.0, 0, 6, 2, 2, 1.75, 2),  # three 2-CPU nodes: an actor can hold no more than one node has
])
def test_the_embedding_pool_uses_the_cpus_decoding_leaves(workers, cpus, gpus, cluster, node, expected, per_actor,
                                                          threads):
    from raysys.config import Config
    from raysys.train_sequence import embedding_pool

    cfg = Config().replace(**{"train.workers": workers, "train.cpus_per_worker": cpus, "train.gpus_per_worker": gpus,
                              "data.decode_cpus": 0.25})
    pool = embedding_pool(cfg, cluster_cpus=cluster, node_cpus=node)
    assert pool.actors == expected and pool.cpus_per_actor == pytest.approx(per_actor)
    assert pool.actors * (0 if gpus else pool.cpus_per_actor) + 0.25 <= cluster or pool.actors == 1
    assert pool.threads == threads


@pytest.mark.parametrize(("scores", "since", "stop_at_2"), [
    ([], 0, False),
    ([0.5], 0, False),
    ([0.5, 0.4, 0.45], 1, False),
    ([0.5, 0.4, 0.45, 0.41], 2, True),
    ([0.5, 0.4, 0.4, 0.4], 2, True),  # a tie is no improvement: the first of equal scores is the best
    ([0.5, 0.6, 0.7, 0.3], 0, False),  # a late best resets the count
])
def test_patience_counts_epochs_since_the_best_score(scores, since, stop_at_2):
    from raysys.sequence import epochs_since_best, patience_spent

    assert epochs_since_best(scores) == since
    assert patience_spent(scores, 2) is stop_at_2
    assert not patience_spent(scores, 0)  # 0 turns it off


def test_a_diverged_epoch_read_back_from_its_checkpoint_still_counts_as_the_worst():
    """Strict JSON stores an infinite score as null; a relaunch compares the scores it reads back."""
    import json

    from raysys import storage
    from raysys.sequence import patience_spent
    from raysys.train import SCORE, restored_history

    history = [{"epoch": 1, SCORE: 0.5}, {"epoch": 2, SCORE: float("inf"), "val_auc_any": float("nan")},
               {"epoch": 3, SCORE: 0.6}]
    stored = json.loads(storage.to_json({"history": history}))["history"]
    assert stored[1][SCORE] is None  # what a relaunch finds
    back = restored_history(stored)
    assert [h[SCORE] for h in back] == [0.5, float("inf"), 0.6]
    assert patience_spent([h[SCORE] for h in back], 2) and not patience_spent([h[SCORE] for h in back], 3)


def test_training_that_leaves_no_cpu_for_its_data_says_so(ray_session, caplog):
    from raysys.runtime import cpus_left

    with caplog.at_level("WARNING", logger="raysys.runtime"):
        assert cpus_left(2 * 0.5, 0.25, "training (2 workers)") == pytest.approx(1.0)  # the defaults fit
        assert not caplog.records
        cpus_left(2 * 1.0, 0.25, "training (2 workers)")
    assert len(caplog.records) == 1
    assert "training (2 workers) takes 2 of the cluster's 2 CPUs" in caplog.text and "--cpus-per-worker" in caplog.text
