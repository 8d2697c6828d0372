# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly score and heat map from an image and its restored (healthy) version (paper, Sec. 2.1 and Fig. 1)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.transforms import MapTransform

__all__ = ["anomaly_map", "anomaly_score", "AnomalyScored", "score_columns"]


def anomaly_map(image: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """Heat map |x - x'|, same shape as the inputs, values in [0, 2] for inputs in [-1, 1]."""
    return (image - restored).abs()


def anomaly_score(image: torch.Tensor, restored: torch.Tensor) -> torch.Tensor:
    """Image-level score mean(|x - x'|) / 2 in [0, 1]: (B, C, H, W) -> (B,), or (C, H, W) -> ()."""
    dims = tuple(range(-3, 0))
    return anomaly_map(image, restored).mean(dim=dims) / 2.0


class AnomalyScored(MapTransform):
    """Adds ``heatmap`` (C, H, W) and ``score`` (1,) to a decollated item holding ``image`` and ``pred``; with a
    ``threshold``, also ``abnormal`` (1,): 1.0 where ``score > threshold``, else 0.0."""

    def __init__(
        self,
        image_key: str = "image",
        pred_key: str = "pred",
        map_key: str = "heatmap",
        score_key: str = "score",
        threshold: float | None = None,
        abnormal_key: str = "abnormal",
    ) -> None:
        super().__init__([image_key, pred_key])
        self.image_key, self.pred_key, self.map_key, self.score_key = image_key, pred_key, map_key, score_key
        self.threshold, self.abnormal_key = threshold, abnormal_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, pred = torch.as_tensor(d[self.image_key]), torch.as_tensor(d[self.pred_key])
        d[self.map_key] = anomaly_map(image, pred)
        d[self.score_key] = anomaly_score(image, pred).reshape(1)
        if self.threshold is not None:
            d[self.abnormal_key] = (d[self.score_key] > self.threshold).float()
        return d


SCORE_COLUMNS = ("score", "abnormal", "in_domain", "domain_distance", "p_value")


def score_columns(output: list[dict]) -> list[torch.Tensor]:
    """``ClassificationSaver`` output transform: one row per item of a decollated output, ``[score, abnormal,
    in_domain, domain_distance, p_value]`` (``abnormal`` is absent when no threshold is known, ``in_domain`` and
    ``domain_distance`` when the model stores no in-domain check (:class:`bundle.domain.DomainCheckd`), ``p_value``
    (in [1 / (n + 1), 1]) when it stores no normal scores (:class:`bundle.conformal.ConformalPValued`))."""
    return [
        torch.cat([torch.as_tensor(item[k]).reshape(1).float() for k in SCORE_COLUMNS if k in item]) for item in output
    ]
