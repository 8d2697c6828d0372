# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The evaluator that scores a labelled set during training, for checkpoint selection and the operating point.

``train.json`` runs two of them: ``validate#evaluator`` on the labelled ``val`` split (metrics ``val_auc``,
``val_ap``) and ``pseudo#evaluator`` on the pseudo-AUC hold-out (``val_pseudo_auc``). They differ in a few named
arguments only; the plumbing they share (data loader, ROC AUC / AP metrics on the anomaly score, console and
TensorBoard logs at the trainer's iteration, early stopping) is built here, where a config macro could not share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import (
    ROCAUC,
    AveragePrecision,
    EarlyStopHandler,
    StatsHandler,
    TensorBoardStatsHandler,
    from_engine,
    stopping_fn_from_metric,
)
from monai.inferers import Inferer
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..handlers.evaluation_report import VolumeLevelMetrics

__all__ = ["SelectionEvaluator"]

logger = logging.getLogger(__name__)


def _world_size() -> int:
    """Processes of a torch.distributed run, 1 for a single process."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def _is_rank_zero() -> bool:
    """Rank 0 of a torch.distributed run, or a single process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class SelectionEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that scores ``dataset`` with the generator during training and logs the selection
    metrics at the trainer's iteration.

    Each item of ``dataset`` is ``{"image": (C, H, W) tensor in [-1, 1], "label": 0 (normal) or 1, ...}``; batches
    of ``batch_size`` go through ``network`` (the generator, (B, C, H, W) -> (B, C, H, W)) and ``postprocessing``
    (:class:`~bundle.transforms.AnomalyScored`: adds ``score``, one float per image). The metrics are the ROC AUC
    (``metric_name``) and, with ``ap_metric_name``, the average precision of ``score`` against ``label``.

    Handlers, attached in this order: ``operating_point`` (every rank: it sets the thresholds and adds its metrics
    before they are logged); for a data set of volumes taken slice by slice (an :class:`~bundle.data.ImageCache`
    with ``slice_rows``; single process only) a :class:`~bundle.handlers.VolumeLevelMetrics` (``<prefix>volume_auc``
    / ``volume_ap``, e.g. ``val_volume_auc``: one score per volume, its top slice's; the key metric stays per
    slice); a ``StatsHandler`` (console, tag ``tag_name``) and a ``TensorBoardStatsHandler`` (``summary_writer``,
    step = ``trainer.state.iteration``; both on rank 0 only); then ``val_handlers`` (e.g. the
    :class:`~bundle.selection.BestModelSaver`; tracking handlers are appended to that list); then, when
    ``early_stop_patience > 0`` and ``early_stop_metric`` is one of this evaluator's metrics, an
    ``EarlyStopHandler`` that ends ``trainer`` after ``early_stop_patience`` validations without improvement.

    Args:
        device: where the generator runs.
        dataset: the labelled items (e.g. a :class:`~bundle.data.ImageCache`).
        network: the generator being trained.
        operating_point: the handler that sets the operating point (an :class:`~bundle.handlers.OperatingPointHandler`).
        trainer: the training engine (log step and early stop).
        summary_writer: TensorBoard writer shared with the trainer.
        metric_name: name of the ROC AUC (the key metric), e.g. ``"val_auc"``.
        ap_metric_name: name of the average precision, or ``None`` for none.
        tag_name: console tag of the metrics line.
        inferer: runs the network (``SimpleInferer`` when ``None``).
        postprocessing: output transform that adds ``score``.
        val_handlers: further handlers (``None`` entries are skipped).
        early_stop_patience: validations without improvement before training stops; 0: never.
        early_stop_metric: the metric early stopping watches.
        batch_size, num_workers, sampler: of the ``DataLoader`` (no shuffling; ``sampler`` shards it over ranks).
    """

    def __init__(
        self,
        device: torch.device | str,
        dataset: Dataset,
        network: nn.Module,
        operating_point: Any,
        trainer: Engine,
        summary_writer: Any,
        metric_name: str,
        ap_metric_name: str | None = None,
        tag_name: str = "val",
        inferer: Inferer | None = None,
        postprocessing: Callable | None = None,
        val_handlers: Sequence | None = None,
        early_stop_patience: int = 0,
        early_stop_metric: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        sampler: Sampler | None = None,
    ) -> None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, sampler=sampler)
        scored = from_engine(["score", "label"])
        key_metric = {metric_name: ROCAUC(output_transform=scored)}
        additional = {ap_metric_name: AveragePrecision(output_transform=scored)} if ap_metric_name else None
        handlers: list = [operating_point]
        if getattr(dataset, "slice_rows", None):  # labelled volumes taken slice by slice: one score per volume too
            if _world_size() == 1:
                handlers.append(VolumeLevelMetrics(prefix=metric_name.removesuffix("auc")))
            elif _is_rank_zero():  # each rank sees a share of every volume's slices, never a whole volume
                logger.warning(f"{tag_name}: no volume-level AUC in multi-GPU training (the slice-level AUC is kept).")
        if _is_rank_zero():
            handlers += [
                StatsHandler(tag_name=tag_name, iteration_log=False),
                TensorBoardStatsHandler(
                    summary_writer=summary_writer,
                    iteration_log=False,
                    global_epoch_transform=lambda epoch: trainer.state.iteration,
                ),
            ]
        handlers += [h for h in val_handlers or () if h is not None]
        if early_stop_patience > 0 and early_stop_metric in {metric_name, ap_metric_name} - {None}:
            handlers.append(
                EarlyStopHandler(
                    trainer=trainer,
                    patience=early_stop_patience,
                    score_function=stopping_fn_from_metric(early_stop_metric),
                    epoch_level=True,
                )
            )
        super().__init__(
            device=device,
            val_data_loader=loader,
            network=network,
            inferer=inferer,
            postprocessing=postprocessing,
            key_val_metric=key_metric,
            additional_metrics=additional,
            val_handlers=handlers,
        )
        self.operating_point = operating_point
        self.metric_name = metric_name
