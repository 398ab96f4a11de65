import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from raysys.labels import LABELS
from raysys.metrics import per_class_auc, per_class_log_loss, prior, roc_auc, summarize, weighted_log_loss


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    y = (rng.random((300, 6)) < 0.3).astype(float)
    y[:, 5] = y[:, :5].max(axis=1)
    p = rng.random((300, 6))
    return y, p


def test_weighted_log_loss_matches_sklearn_with_sample_weights(arrays):
    y, p = arrays
    # The competition score is one log loss over all cells, each weighted 2 (any) or 1.
    weights = np.tile([1, 1, 1, 1, 1, 2], len(y))
    expected = log_loss(y.reshape(-1), p.reshape(-1), sample_weight=weights, labels=[0, 1])
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-12)


def test_weighted_log_loss_clips_to_competition_epsilon():
    y = np.zeros((1, 6))
    y[0, 5] = 1
    p = np.zeros((1, 6))  # any = 0 for a positive: clipped to 1e-15, not infinite
    expected = 2 * -np.log(1e-15) / 7
    assert weighted_log_loss(y, p) == pytest.approx(expected, rel=1e-9)
    assert np.isfinite(weighted_log_loss(y, np.ones((1, 6))))


def test_perfect_predictions_score_near_zero_and_any_weighs_double():
    y = np.eye(6)
    assert weighted_log_loss(y, y) < 1e-12
    wrong_any, wrong_epi = y.copy(), y.copy()
    wrong_any[:, 5] = 0.5
    wrong_epi[:, 0] = 0.5
    assert weighted_log_loss(y, wrong_any) == pytest.approx(2 * weighted_log_loss(y, wrong_epi))


def test_per_class_metrics_match_sklearn(arrays):
    y, p = arrays
    losses, aucs = per_class_log_loss(y, p), per_class_auc(y, p)
    assert list(losses) == list(LABELS) == list(aucs)
    for j, name in enumerate(LABELS):
        assert losses[name] == pytest.approx(log_loss(y[:, j], p[:, j], labels=[0, 1]), rel=1e-12)
        assert aucs[name] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))


@pytest.mark.parametrize("decimals", [1, 2])
def test_auc_with_tied_scores_matches_sklearn(arrays, decimals):
    """Rounded scores tie often (a sigmoid saturating, a calibrated model's steps): ties count half."""
    y, p = arrays
    p = np.round(p, decimals)
    aucs = per_class_auc(y, p)
    for j, name in enumerate(LABELS):
        assert aucs[name] == pytest.approx(roc_auc_score(y[:, j], p[:, j]), rel=1e-12)
    y1 = np.array([0, 1, 0, 1, 1, 0], float)
    assert roc_auc(y1, np.full(6, 0.3)) == 0.5  # all tied: chance
    assert roc_auc(y1, y1) == 1.0 and roc_auc(y1, 1 - y1) == 0.0


def test_auc_is_nan_for_a_single_class_column(arrays):
    y, p = arrays
    y[:, 0] = 0
    assert np.isnan(per_class_auc(y, p)["epidural"])


def test_prior_and_summary(arrays):
    y, p = arrays
    assert np.allclose(prior(y), y.sum(axis=0) / len(y))
    train = y[:100].copy()
    train[:50, 0] = 1  # a training prevalence unlike the scored images'
    out = summarize(y, p, y_train=train)
    baseline = np.tile(train.mean(axis=0), (len(y), 1))
    weights = np.tile([1, 1, 1, 1, 1, 2], len(y))
    expected = log_loss(y.reshape(-1), baseline.reshape(-1), sample_weight=weights, labels=[0, 1])
    assert out["prior_weighted_log_loss"] == pytest.approx(expected)
    own = log_loss(y.reshape(-1), np.tile(y.mean(axis=0), (len(y), 1)).reshape(-1), sample_weight=weights, labels=[0, 1])
    assert summarize(y, p)["prior_weighted_log_loss"] == pytest.approx(own) != expected  # without y_train: its own
    assert out["n_images"] == 300


@pytest.mark.parametrize("bad", [np.zeros((3, 5)), np.zeros((0, 6))])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError):
        weighted_log_loss(bad, bad)
