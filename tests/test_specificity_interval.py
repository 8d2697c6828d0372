"""The operating threshold's promise: where the specificity on new normal images should lie, given how many normal
scores set the threshold (an order statistic: beta-binomial), and the evaluation's warning when it does not."""

import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from bundle.handlers import EvaluationReportHandler, OperatingPointHandler
from bundle.handlers.operating_point import specificity_interval


@pytest.mark.parametrize("n, rank, m", [(100, 96, 100), (100, 96, 234), (20, 20, 50), (500, 476, 1000)])
def test_interval_is_the_beta_binomial_one(n, rank, m):
    betabinom = pytest.importorskip("scipy.stats").betabinom
    low, high = betabinom.ppf([0.025, 0.975], m, rank, n + 1 - rank)
    assert specificity_interval(n, rank, m) == pytest.approx((low / m, high / m))


def test_interval_covers_95_percent_of_simulated_evaluations():
    """100 normal val scores set the 0.95 threshold ("higher" quantile), 234 new normal scores from the same
    distribution are evaluated: the realised specificity falls inside the interval in 95-98.5% of 4000 draws
    (a discrete interval covers at least 95%; an interval much too wide would cover nearly all)."""
    rng = np.random.default_rng(0)
    n, m, q = 100, 234, 0.95
    rank = int(np.ceil(q * (n - 1))) + 1
    low, high = specificity_interval(n, rank, m)
    inside = 0
    for _ in range(4000):
        threshold = np.quantile(rng.random(n), q, method="higher")
        inside += low <= (rng.random(m) <= threshold).mean() <= high
    assert 0.95 <= inside / 4000 <= 0.985 and 0.85 < low < high < 1


def test_operating_point_records_how_its_threshold_was_set():
    handler = OperatingPointHandler(torch.nn.Linear(1, 1), image_size=8, specificity=0.95)
    handler.network.hparams = {}
    normal = list(np.random.default_rng(1).permutation(np.arange(1, 41) / 100))  # 40 distinct scores
    engine = Engine(lambda e, b: None)
    engine.state.output = [{"score": s, "label": 0, "heatmap": torch.zeros(1, 4, 4)} for s in normal]
    handler._reset(engine)
    handler._collect(engine)
    handler._choose(engine)
    point = handler.operating_point
    assert point["threshold_normals"] == 40 and point["threshold"] == sorted(normal)[point["threshold_rank"] - 1]
    assert point["threshold_rank"] == 39  # ceil(0.95 * 39) + 1
    restored = OperatingPointHandler(torch.nn.Linear(1, 1), image_size=8)
    restored.load_state_dict(point)
    assert restored.operating_point["threshold_rank"] == 39 and restored.operating_point["threshold_normals"] == 40


def test_evaluation_warns_when_the_realised_specificity_is_outside(tmp_path, caplog):
    """The chest set's case: 0.95 promised on 100 val normals, 0.82 realised on its 231 test normals."""
    settings = {"threshold": 0.5, "specificity": 0.95, "threshold_normals": 100, "threshold_rank": 96}
    report = EvaluationReportHandler(str(tmp_path), threshold=0.5, settings=settings)
    with caplog.at_level(logging.INFO, logger="bundle.handlers.evaluation_report"):
        assert report._specificity_interval(0.95, 231) == pytest.approx(list(specificity_interval(100, 96, 231)))
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        report._specificity_interval(0.82, 231)
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "specificity 0.820 on 231 normal images" in warning.getMessage() and "OUTSIDE" in warning.getMessage()
    assert EvaluationReportHandler(str(tmp_path), threshold=0.5)._specificity_interval(0.82, 231) is None
    overridden = EvaluationReportHandler(str(tmp_path), threshold=0.7, settings=settings)  # not the model's threshold
    assert overridden._specificity_interval(0.82, 231) is None
