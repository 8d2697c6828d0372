# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The operating point a trained model carries: score and heat-map thresholds chosen on the normal ``val`` images."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from .. import __version__
from ..conformal import stored_normal_scores
from ..settings import network_def_of
from ..transforms.regions import smooth_heatmap

__all__ = ["OperatingPointHandler", "score_threshold", "specificity_interval"]

logger = logging.getLogger(__name__)


def specificity_interval(n_normals: int, rank: int, m: int, coverage: float = 0.95) -> tuple[float, float]:
    """Where the specificity measured on ``m`` new normal images should lie, for a threshold that is the ``rank``-th
    smallest of ``n_normals`` normal scores (``abnormal = score > threshold``).

    For continuous scores the share of all normal images at or below the ``rank``-th of ``n_normals`` is
    Beta(rank, n_normals + 1 - rank) distributed, so the count of ``m`` new ones at or below it is beta-binomial;
    returns its central ``coverage`` interval divided by ``m``. It holds when the new images come from the same
    distribution as those the threshold was set on; a realised specificity outside it means they do not (a shift
    between the sets, or a checkpoint chosen on the very images that set the threshold)."""
    a, b = rank, n_normals + 1 - rank
    x = np.arange(m + 1)
    lgamma = np.vectorize(math.lgamma)
    log_pmf = (
        lgamma(m + 1) - lgamma(x + 1) - lgamma(m - x + 1)
        + lgamma(x + a) + lgamma(m - x + b) - lgamma(m + a + b)
        - (lgamma(a) + lgamma(b) - lgamma(a + b))
    )  # fmt: skip
    cdf = np.cumsum(np.exp(log_pmf))
    low, high = (int(np.searchsorted(cdf, p - 1e-12)) for p in ((1 - coverage) / 2, (1 + coverage) / 2))
    return low / m, high / m


def score_threshold(normal_scores: np.ndarray, specificity: float) -> dict[str, Any]:
    """The operating threshold set on normal scores (n,): the ``specificity`` quantile (numpy's "higher" method,
    so that ``abnormal = score > threshold`` keeps at least that share of them normal), how many scores set it
    (``threshold_normals``), its 1-based ascending rank among them (``threshold_rank``) and the scores themselves as
    a model stores them (``normal_scores``, :func:`~bundle.conformal.stored_normal_scores`)."""
    normal = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    if normal.size == 0:
        raise ValueError("no normal scores: no operating threshold can be chosen.")
    return {
        "threshold": float(np.quantile(normal, specificity, method="higher")),
        "threshold_normals": int(normal.size),
        "threshold_rank": int(np.ceil(specificity * (normal.size - 1))) + 1,  # "higher": sorted[ceil(q (n - 1))]
        "normal_scores": stored_normal_scores(normal),
    }


class OperatingPointHandler:
    """Validation handler that, after every validation pass, chooses the model's operating thresholds and holds
    the settings the model file carries (see :mod:`bundle.settings`).

    - ``threshold``: the ``specificity`` quantile of the anomaly scores of the normal (label 0) images, so that
      ``abnormal = score > threshold`` keeps at least that share of them normal;
    - ``pixel_threshold``: the ``pixel_quantile`` quantile of all pixels of their smoothed heat maps;
    - ``threshold_normals`` and ``threshold_rank``: how many normal scores set the threshold and which of them
      (1-based, ascending) it is; evaluation turns them into the interval the realised specificity should lie in
      (:func:`specificity_interval`);
    - ``normal_scores``: those normal scores, sorted ascending (n,), as plain floats, so that inference can turn a
      score into a conformal p-value (:mod:`bundle.conformal`); of more than
      :data:`~bundle.conformal.MAX_NORMAL_SCORES` (2000) normal images, 2000 evenly spaced order statistics of
      their scores (:func:`~bundle.conformal.stored_normal_scores`).

    It adds ``val_sensitivity`` and ``val_specificity`` at ``threshold`` to the evaluator's metrics (attach it
    before the StatsHandler / TensorBoard handlers to log them). Put it into the best-model saver's ``save_dict``
    as ``"settings"``: ``state_dict()`` returns the settings of the latest validation pass.

    Args:
        network: the generator being validated (its ``hparams`` are recorded).
        image_size: side of the square model input.
        slice_index: slice taken from 3D inputs, or None.
        slice_axis: the axis along which 3D volumes were taken slice by slice, or None (volumes not sliced);
            recorded, so that evaluation and inference slice the same way.
        specificity: share of normal val images below the score threshold, in (0, 1).
        pixel_quantile: quantile of normal heat-map pixels that sets the region threshold, in (0, 1).
        score_key, label_key, map_key: keys of the decollated evaluator output (``AnomalyScored``'s output).
    """

    def __init__(
        self,
        network: nn.Module,
        image_size: int,
        slice_index: int | None = None,
        slice_axis: int | None = -1,
        specificity: float = 0.95,
        pixel_quantile: float = 0.99,
        score_key: str = "score",
        label_key: str = "label",
        map_key: str = "heatmap",
    ) -> None:
        for name, value in (("specificity", specificity), ("pixel_quantile", pixel_quantile)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}.")
        self.network = network
        self.image_size = int(image_size)
        self.slice_index = slice_index
        self.slice_axis = None if slice_axis is None else int(slice_axis)
        self.specificity = float(specificity)
        self.pixel_quantile = float(pixel_quantile)
        self.score_key, self.label_key, self.map_key = score_key, label_key, map_key
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._normal_maps: list[torch.Tensor] = []
        self.operating_point: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._choose)

    def _reset(self, engine: Engine) -> None:
        self._scores, self._labels, self._normal_maps = [], [], []

    def _collect(self, engine: Engine) -> None:
        for item in engine.state.output:
            label = int(item[self.label_key])
            self._scores.append(float(item[self.score_key]))
            self._labels.append(label)
            if label == 0:
                self._normal_maps.append(torch.as_tensor(item[self.map_key]).detach().float().cpu())

    def _choose(self, engine: Engine) -> None:
        scores, labels = np.asarray(self._scores), np.asarray(self._labels)
        normal = scores[labels == 0]
        if normal.size == 0:
            raise ValueError("the validation split has no normal images: no operating threshold can be chosen.")
        chosen = score_threshold(normal, self.specificity)
        threshold = chosen["threshold"]
        pixels = smooth_heatmap(torch.stack(self._normal_maps)).flatten().numpy()
        abnormal = scores[labels == 1]
        self.operating_point = {
            "threshold": threshold,
            "specificity": self.specificity,
            "pixel_threshold": float(np.quantile(pixels, self.pixel_quantile)),
            "pixel_quantile": self.pixel_quantile,
            "threshold_normals": chosen["threshold_normals"],
            "threshold_rank": chosen["threshold_rank"],
            "normal_scores": chosen["normal_scores"],
            "val_specificity": float((normal <= threshold).mean()),
            "val_sensitivity": float((abnormal > threshold).mean()) if abnormal.size else float("nan"),
        }
        engine.state.metrics["val_sensitivity"] = self.operating_point["val_sensitivity"]
        engine.state.metrics["val_specificity"] = self.operating_point["val_specificity"]

    def state_dict(self) -> dict[str, Any]:
        """The settings a model saved now carries (plain values: loadable with ``weights_only=True``)."""
        return {
            "network_def": network_def_of(self.network),
            "image_size": self.image_size,
            "slice_index": self.slice_index,
            "slice_axis": self.slice_axis,
            **self.operating_point,
            "bundle_version": __version__,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = (
            "threshold",
            "specificity",
            "pixel_threshold",
            "pixel_quantile",
            "threshold_normals",
            "threshold_rank",
            "normal_scores",
            "val_specificity",
            "val_sensitivity",
        )
        self.operating_point = {k: state[k] for k in keys if k in state}
