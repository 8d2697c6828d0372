# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Conformal p-values: how unusual an anomaly score is among the normal scores that set the model's threshold.

A model stores the sorted anomaly scores of the normal images that set its operating threshold (``normal_scores``
in its settings: :class:`bundle.handlers.OperatingPointHandler`). The p-value of a new score s among those n scores,

    p(s) = (1 + #{normal scores >= s}) / (n + 1),  in [1 / (n + 1), 1],

is valid for a new normal image exchangeable with them (the same distribution): P(p <= alpha) <= alpha for every
alpha in [0, 1]. Calling an image abnormal when ``p <= alpha`` therefore flags at most a share ``alpha`` of the
normal images, for any alpha chosen at inference time, without retraining (Vovk et al., "Algorithmic Learning in a
Random World", 2005; Bates et al., "Testing for outliers with conformal p-values", Ann. Statist. 2023). The
guarantee is marginal (over the normal scores and the new image) and holds only as far as the new normal images are
like those that set the threshold: :class:`bundle.domain.DomainCheckd` flags images that are not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

__all__ = [
    "MAX_NORMAL_SCORES",
    "ALPHAS",
    "stored_normal_scores",
    "conformal_p_value",
    "clopper_pearson",
    "ConformalPValued",
]

MAX_NORMAL_SCORES = 2000  # a model stores at most this many normal scores (order statistics beyond it)
ALPHAS = (0.01, 0.05, 0.1)  # the levels an evaluation reports


def stored_normal_scores(scores: Sequence[float] | np.ndarray) -> list[float]:
    """The normal scores a model stores: all of them, sorted ascending, as plain floats (n,); of more than
    :data:`MAX_NORMAL_SCORES`, that many evenly spaced order statistics (the smallest and the largest included),
    which gives the p-values of all n scores to within about 1 / MAX_NORMAL_SCORES."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if ordered.size > MAX_NORMAL_SCORES:
        ordered = ordered[np.round(np.linspace(0, ordered.size - 1, MAX_NORMAL_SCORES)).astype(np.int64)]
    return [float(s) for s in ordered]


def conformal_p_value(
    score: float | np.ndarray | torch.Tensor, normal_scores: Sequence[float] | np.ndarray
) -> np.ndarray:
    """``(1 + #{normal_scores >= score}) / (n + 1)`` for each element of ``score`` (any shape; the result has its
    shape, float64, values in [1 / (n + 1), 1]; a tie with a normal score counts as >=). ``normal_scores``: (n,),
    n >= 1, in any order."""
    normal = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    if normal.size == 0:
        raise ValueError("conformal_p_value needs at least one normal score.")
    s = torch.as_tensor(score).detach().cpu().double().numpy() if torch.is_tensor(score) else np.asarray(score, float)
    at_or_above = normal.size - np.searchsorted(normal, s, side="left")
    return (1.0 + at_or_above) / (normal.size + 1.0)


def _binomial_cdf(k: int, m: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(m, p), 0 <= k < m, 0 < p < 1."""
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(m + 1) - math.lgamma(x + 1) - math.lgamma(m - x + 1) + x * log_p + (m - x) * log_q
        for x in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def _solve_decreasing(f: Callable[[float], float], target: float) -> float:
    """The p in (0, 1) where the decreasing function ``f`` equals ``target`` (bisection to 1e-12)."""
    low, high = 0.0, 1.0
    while high - low > 1e-12:
        mid = (low + high) / 2
        low, high = (mid, high) if f(mid) > target else (low, mid)
    return (low + high) / 2


def clopper_pearson(k: int, m: int, coverage: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``coverage`` interval, within [0, 1], of a proportion seen as ``k`` of ``m``
    (0 <= k <= m, m >= 1): the lower end solves P(X >= k) = (1 - coverage) / 2, the upper end P(X <= k) =
    (1 - coverage) / 2, X ~ Binomial(m, p)."""
    if not 0 <= k <= m or m < 1:
        raise ValueError(f"clopper_pearson needs 0 <= k <= m and m >= 1, got k={k}, m={m}.")
    tail = (1 - coverage) / 2
    low = 0.0 if k == 0 else _solve_decreasing(lambda p: _binomial_cdf(k - 1, m, p), 1.0 - tail)
    high = 1.0 if k == m else _solve_decreasing(lambda p: _binomial_cdf(k, m, p), tail)
    return low, high


class ConformalPValued(Transform):
    """Adds ``p_value`` (1,), in [1 / (n + 1), 1], to a decollated item from its ``score`` (1,): the conformal
    p-value (:func:`conformal_p_value`) among the model's stored ``normal_scores`` (n,) (its settings'
    ``normal_scores``). For a model that stores none (trained before p-values existed) the item is returned
    unchanged.

    With ``alpha`` in (0, 1), ``abnormal`` (1,) becomes 1.0 where ``p_value <= alpha``, else 0.0 (at most a share
    ``alpha`` of normal images flagged), replacing ``score > threshold``; with ``alpha`` None (the default)
    ``abnormal`` stays the model's threshold decision.

    Raises:
        ValueError: ``alpha`` outside (0, 1), or an ``alpha`` for a model that stores no normal scores.
    """

    def __init__(
        self,
        normal_scores: Sequence[float] | None,
        alpha: float | None = None,
        score_key: str = "score",
        p_value_key: str = "p_value",
        abnormal_key: str = "abnormal",
    ) -> None:
        if alpha is not None and not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
        if alpha is not None and not normal_scores:
            raise ValueError(
                f"alpha {alpha} needs the normal scores that set the model's threshold, and this model stores none "
                "(trained before p-values existed): leave alpha out to use its threshold, or train it again."
            )
        self.normal_scores = np.sort(np.asarray(normal_scores, dtype=np.float64)) if normal_scores else None
        self.alpha = alpha
        self.score_key, self.p_value_key, self.abnormal_key = score_key, p_value_key, abnormal_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.normal_scores is None:
            return d
        p_value = conformal_p_value(d[self.score_key], self.normal_scores).reshape(1)
        d[self.p_value_key] = torch.as_tensor(p_value, dtype=torch.float32)
        if self.alpha is not None:
            d[self.abnormal_key] = torch.as_tensor(p_value <= self.alpha, dtype=torch.float32)
        return d
