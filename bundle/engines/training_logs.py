# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""What the trainer logs: loss terms to the console and TensorBoard, restoration grids, a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler
from torch import nn

from ..data import display_batch
from ..handlers import RestorationImageHandler
from .trainer import loss_terms

__all__ = ["TrainingLogs"]


class TrainingLogs:
    """The trainer's loggers, attached together (in this order):

    - ``StatsHandler`` (tag ``train``): every loss term (:func:`~bundle.engines.loss_terms`) on the console every
      ``log_interval`` iterations;
    - ``TensorBoardStatsHandler`` (tag ``train``): the same terms to ``summary_writer`` every
      ``tensorboard_interval`` iterations;
    - :class:`~bundle.handlers.RestorationImageHandler`: every ``image_log_interval`` iterations a grid of fixed
      images (:func:`~bundle.data.display_batch`, (K, 1, H, W): the first normal and abnormal images of the first
      non-empty set of ``image_sets``), restored by ``generator``, with their heat maps;
    - with ``progress_bar``, ignite's ``ProgressBar`` (not kept after each epoch).

    Only writes: ``rank_zero_only``, so multi-GPU training attaches it on rank 0 only.

    Args:
        summary_writer: TensorBoard writer (shared with the evaluators).
        generator: the generator being trained.
        image_sets: labelled caches to take the grid's images from, in order of preference (``val``, hold-out).
        log_interval, tensorboard_interval, image_log_interval: iterations between two logs of each kind.
        progress_bar: whether to show a progress bar.
    """

    rank_zero_only = True

    def __init__(
        self,
        summary_writer: Any,
        generator: nn.Module,
        image_sets: Sequence,
        log_interval: int = 50,
        tensorboard_interval: int = 10,
        image_log_interval: int = 50,
        progress_bar: bool = True,
    ) -> None:
        self.log_interval = int(log_interval)
        self.handlers: list = [
            StatsHandler(
                tag_name="train",
                output_transform=loss_terms,
                iteration_log=lambda engine, iteration: iteration % self.log_interval == 0,
            ),
            TensorBoardStatsHandler(
                summary_writer=summary_writer,
                tag_name="train",
                output_transform=loss_terms,
                iteration_log=tensorboard_interval,
            ),
            RestorationImageHandler(
                summary_writer=summary_writer,
                generator=generator,
                images=display_batch(next((s for s in image_sets if len(s)), image_sets[-1])),
                interval=image_log_interval,
            ),
        ]
        if progress_bar:
            self.handlers.append(ProgressBar(persist=False))

    def attach(self, engine: Engine) -> None:
        for handler in self.handlers:
            handler.attach(engine)
