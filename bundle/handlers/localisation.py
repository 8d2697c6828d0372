# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Evaluation handler: localisation metrics of the heat maps against known lesion masks."""

from __future__ import annotations

import logging

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..localisation import peak_in_lesion, pixel_auroc, region_dice

__all__ = ["LocalisationHandler"]

logger = logging.getLogger(__name__)


class LocalisationHandler:
    """Collects the heat maps of the abnormal images that have a lesion mask and, when the evaluation epoch
    completes, adds to the evaluator's metrics (so that ``EvaluationReportHandler`` writes them to metrics.json
    and prints them): ``pixel_auroc``, ``peak_in_lesion``, ``region_dice`` (with a ``pixel_threshold``) and
    ``n_lesion_masks`` (the number of images they are computed on); see :mod:`bundle.localisation`. Nothing is
    added when no abnormal image has a mask.

    Reads the decollated ``engine.state.output`` (``map_key``: (1, H, W) heat map, ``label_key``) and
    ``engine.state.batch`` (``mask_key``: (1, H, W) mask in {0, 1}, ``flag_key``: 1 where a mask was given), as
    prepared by :class:`bundle.localisation.LoadLesionMaskd`.

    Args:
        pixel_threshold: the model's heat-map threshold (``settings["pixel_threshold"]``); None: no ``region_dice``.
    """

    def __init__(
        self,
        pixel_threshold: float | None = None,
        map_key: str = "heatmap",
        label_key: str = "label",
        mask_key: str = "mask",
        flag_key: str = "has_mask",
    ) -> None:
        self.pixel_threshold = pixel_threshold
        self.map_key, self.label_key, self.mask_key, self.flag_key = map_key, label_key, mask_key, flag_key
        self.heatmaps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, engine: Engine) -> None:
        self.heatmaps, self.masks = [], []

    def _collect(self, engine: Engine) -> None:
        for source, item in zip(engine.state.batch, engine.state.output):  # both decollated
            if int(item[self.label_key]) != 1 or not int(source.get(self.flag_key, 0)):
                continue
            self.heatmaps.append(torch.as_tensor(item[self.map_key]).detach().float().cpu())
            self.masks.append(torch.as_tensor(source[self.mask_key]).detach().float().cpu())

    def _compute(self, engine: Engine) -> None:
        if not self.heatmaps:
            return
        heatmaps, masks = torch.stack(self.heatmaps), torch.stack(self.masks)
        if tuple(heatmaps.shape[-2:]) != tuple(masks.shape[-2:]):
            raise ValueError(f"heat maps {tuple(heatmaps.shape)} and lesion masks {tuple(masks.shape)} differ in size.")
        metrics = {
            "pixel_auroc": pixel_auroc(heatmaps, masks),
            "peak_in_lesion": float(np.mean(peak_in_lesion(heatmaps, masks))),
        }
        if self.pixel_threshold is not None:
            metrics["region_dice"] = float(np.mean(region_dice(heatmaps, masks, self.pixel_threshold)))
        metrics["n_lesion_masks"] = len(self.heatmaps)
        engine.state.metrics.update(metrics)
        logger.info(
            f"localisation on {len(self.heatmaps)} abnormal images with lesion masks: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n_lesion_masks")
        )
