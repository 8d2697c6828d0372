# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""A wall-clock budget for training ("train for 30 minutes"), stopping cleanly."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["TrainingTimeLimit"]

logger = logging.getLogger(__name__)


class TrainingTimeLimit:
    """Stops the trainer after the iteration during which ``max_minutes`` of training have passed (counted from the
    trainer's start in this process; start-up and image decoding are not counted). ``engine.terminate()`` fires
    COMPLETED, so the final checkpoint is written and ``models/model.pt`` stays the best-val model.

    Args:
        max_minutes: the budget in minutes; ``None`` or ``<= 0``: no limit.
    """

    def __init__(self, max_minutes: float | None = None) -> None:
        self.max_minutes = max_minutes
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        if self.max_minutes is None or self.max_minutes <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._start_clock)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _start_clock(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _check(self, engine: Engine) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        stop = minutes >= self.max_minutes
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # multi-GPU: every rank must stop after the same iteration, or the others wait in the next all-reduce
            flag = torch.tensor(float(stop), device=engine.state.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            logger.info(
                f"time budget of {self.max_minutes} min reached at iteration {engine.state.iteration}: stopping"
            )
            engine.terminate()
