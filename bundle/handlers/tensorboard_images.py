# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""TensorBoard image grid of fixed validation images, their restored versions and heat maps during training."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..visualize import restoration_grid

__all__ = ["RestorationImageHandler"]


class RestorationImageHandler:
    """Every ``interval`` iterations, restores ``images`` with ``generator`` in eval mode and writes the grid
    (inputs / restored / heat maps) to TensorBoard under ``tag``, at the trainer's iteration.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (share the one of TensorBoardStatsHandler).
        generator: the generator being trained.
        images: (K, 1, H, W) in [-1, 1]; see :func:`bundle.data.display_batch` to take them from a data set.
        interval: iterations between two grids.
    """

    def __init__(
        self, summary_writer, generator: nn.Module, images: torch.Tensor, interval: int = 200, tag="restoration"
    ):
        self.writer = summary_writer
        self.generator = generator
        self.images = images
        self.interval = interval
        self.tag = tag

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(
            Events.COMPLETED(event_filter=lambda e, _: e.state.iteration % self.interval != 0), self
        )

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        was_training = self.generator.training
        self.generator.eval()
        device = next(self.generator.parameters()).device
        restored = self.generator(self.images.to(device))
        self.generator.train(was_training)
        self.writer.add_image(self.tag, restoration_grid(self.images, restored.cpu()), engine.state.iteration)
        self.writer.flush()
