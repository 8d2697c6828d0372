"""Conformal p-values: the arithmetic on hand-made scores, the alpha decision, the normal scores a model stores (and
their round trip through a model file), and the evaluation's false-positive rates with Clopper-Pearson intervals."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from bundle.conformal import (
    MAX_NORMAL_SCORES,
    ConformalPValued,
    clopper_pearson,
    conformal_p_value,
    stored_normal_scores,
)
from bundle.handlers import EvaluationReportHandler, OperatingPointHandler
from bundle.settings import load_model_settings, model_file_contents, read_model
from bundle.transforms import score_columns

NORMAL = [0.3, 0.1, 0.2, 0.2]  # n = 4, in no order, one tie


@pytest.mark.parametrize(
    "score, expected",
    [
        (0.9, 1 / 5),  # above all normal scores: the smallest p-value, 1 / (n + 1)
        (0.3, 2 / 5),  # equal to the largest: the tie counts
        (0.25, 2 / 5),
        (0.2, 4 / 5),  # a tie with two normal scores counts both
        (0.15, 4 / 5),
        (0.1, 5 / 5),
        (0.0, 1.0),  # below all: 1
    ],
)
def test_p_value_by_hand(score, expected):
    assert conformal_p_value(score, NORMAL) == pytest.approx(expected, abs=1e-15)


def test_p_value_is_vectorised_over_numpy_and_torch():
    scores = np.array([[0.9, 0.2], [0.0, 0.25]])
    expected = np.array([[1 / 5, 4 / 5], [1.0, 2 / 5]])
    np.testing.assert_allclose(conformal_p_value(scores, NORMAL), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(conformal_p_value(torch.tensor(scores), np.array(NORMAL)), expected, atol=1e-15)
    with pytest.raises(ValueError, match="at least one normal score"):
        conformal_p_value(0.5, [])


def test_p_values_of_new_normal_scores_are_valid():
    """P(p <= alpha) <= alpha for a new score exchangeable with the n normal ones: with n + 1 = 100 the share at
    alpha = 0.05 is exactly 5 / 100 in expectation; over 4000 draws within a binomial margin of it."""
    rng = np.random.default_rng(0)
    p = np.array([conformal_p_value(rng.random(), rng.random(99)) for _ in range(4000)])
    assert p.min() >= 1 / 100 and p.max() <= 1
    for alpha in (0.01, 0.05, 0.1):
        assert abs((p <= alpha).mean() - alpha) < 3 * np.sqrt(alpha * (1 - alpha) / 4000)


def test_transform_adds_p_value_and_decides_by_alpha_only_when_asked():
    normal = list(np.arange(1, 20) / 20)  # n = 19: a score above all gets p = 1 / 20 = 0.05
    item = {"score": torch.tensor([0.99]), "abnormal": torch.tensor([0.0])}  # normal by the model's threshold
    kept = ConformalPValued(normal)(item)
    assert kept["p_value"].shape == (1,) and kept["p_value"].item() == pytest.approx(0.05)
    assert kept["abnormal"].item() == 0.0  # no alpha: the threshold's decision stays
    assert ConformalPValued(normal, alpha=0.05)(item)["abnormal"].tolist() == [1.0]  # p <= alpha, ties included
    assert ConformalPValued(normal, alpha=0.049)(item)["abnormal"].tolist() == [0.0]
    low = {"score": torch.tensor([0.0]), "abnormal": torch.tensor([1.0])}
    assert ConformalPValued(normal, alpha=0.5)(low)["abnormal"].tolist() == [0.0]
    assert ConformalPValued(None)(item) == item  # a model without normal scores: unchanged
    with pytest.raises(ValueError, match="stores none"):
        ConformalPValued(None, alpha=0.05)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
        ConformalPValued(normal, alpha=1.0)


def test_score_columns_put_p_value_last():
    item = {"score": torch.tensor([0.25]), "abnormal": torch.tensor([0.0]), "in_domain": torch.tensor([1.0])}
    item.update(domain_distance=torch.tensor([3.0]), p_value=torch.tensor([0.5]))
    assert score_columns([item])[0].tolist() == [0.25, 0.0, 1.0, 3.0, 0.5]


def test_stored_normal_scores_are_sorted_and_subsampled_beyond_the_limit():
    assert stored_normal_scores(np.array(NORMAL)) == [0.1, 0.2, 0.2, 0.3]
    many = np.random.default_rng(2).random(5000)
    stored = stored_normal_scores(many)
    assert len(stored) == MAX_NORMAL_SCORES and stored == sorted(stored)
    assert stored[0] == many.min() and stored[-1] == many.max() and set(stored) <= set(many.tolist())
    probe = np.linspace(0, 1, 101)
    assert np.abs(conformal_p_value(probe, stored) - conformal_p_value(probe, many)).max() < 2 / MAX_NORMAL_SCORES


def test_normal_scores_round_trip_through_a_model_file(tmp_path):
    network = torch.nn.Linear(1, 1)
    network.hparams = {}
    handler = OperatingPointHandler(network, image_size=8)
    scores = list(np.random.default_rng(1).permutation(np.arange(1, 41) / 100))
    engine = Engine(lambda e, b: None)
    engine.state.output = [{"score": s, "label": 0, "heatmap": torch.zeros(1, 4, 4)} for s in scores]
    engine.state.output += [{"score": 0.5, "label": 1, "heatmap": torch.zeros(1, 4, 4)}]  # not a normal score
    handler._reset(engine)
    handler._collect(engine)
    handler._choose(engine)
    path = tmp_path / "model.pt"
    torch.save(model_file_contents(network.state_dict(), handler.state_dict()), path)
    stored = read_model(str(path))[1]["normal_scores"]
    assert stored == sorted(scores) and all(type(s) is float for s in stored)
    assert load_model_settings(str(path))["normal_scores"] == stored
    restored = OperatingPointHandler(network, image_size=8)
    restored.load_state_dict(read_model(str(path))[1])
    assert restored.operating_point["normal_scores"] == stored
    # here the stored threshold and the p-values agree: a score just above it has p <= 1 - specificity
    threshold = handler.operating_point["threshold"]
    assert conformal_p_value(threshold + 1e-9, stored) <= 1 - 0.95 < conformal_p_value(threshold, stored)


@pytest.mark.parametrize("k, m", [(0, 20), (3, 20), (20, 20), (7, 231), (1, 1)])
def test_clopper_pearson_is_the_beta_quantile_interval(k, m):
    beta = pytest.importorskip("scipy.stats").beta
    low = beta.ppf(0.025, k, m - k + 1) if k > 0 else 0.0
    high = beta.ppf(0.975, k + 1, m - k) if k < m else 1.0
    assert clopper_pearson(k, m) == pytest.approx((low, high), abs=1e-9)


def test_evaluation_reports_false_positive_rates_at_each_alpha(tmp_path, caplog):
    """20 normal images, 2 with p <= 0.01 (far more than 0.01 promises: a warning), 10 abnormal images."""
    report = EvaluationReportHandler(str(tmp_path))
    normal_p = [0.005, 0.008, 0.04, 0.09] + [0.5] * 16
    abnormal_p = [0.001] * 5 + [0.03] * 3 + [0.2] * 2
    report.rows = [(f"n{i}.png", 0, 0.1) for i in range(20)] + [(f"a{i}.png", 1, 0.9) for i in range(10)]
    report.p_values = normal_p + abnormal_p
    report.images = report.restored = [torch.zeros(1, 8, 8)] * 30
    engine = Engine(lambda e, b: None)
    engine.state.metrics = {"auc": 1.0}
    with caplog.at_level(logging.INFO, logger="bundle.handlers.evaluation_report"):
        report._write(engine)
    levels = json.load(open(tmp_path / "metrics.json"))["conformal"]
    assert [level["alpha"] for level in levels] == [0.01, 0.05, 0.1]
    assert [level["false_positives"] for level in levels] == [2, 3, 4]
    assert [level["false_positive_rate"] for level in levels] == [0.1, 0.15, 0.2]
    assert [level["sensitivity"] for level in levels] == [0.5, 0.8, 0.8]
    assert levels[0]["false_positive_rate_interval"] == pytest.approx(list(clopper_pearson(2, 20)))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "2 of 20 normal images flagged" in warned[0]  # 0.01 < CP low end of 2/20 (0.012)
    rows = list(csv.reader(open(tmp_path / "scores.csv")))
    assert rows[0] == ["file", "label", "score", "p_value"] and float(rows[1][3]) == 0.005
