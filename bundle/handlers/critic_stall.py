# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Detects the critic stall of WGAN-GP training: a critic whose input gradient stays at zero."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer

__all__ = ["CriticStallDetector", "RestartCritic"]

logger = logging.getLogger(__name__)


class CriticStallDetector:
    """Warns once when the critic has stalled, shows it in TensorBoard and records it for the model's settings.

    In a stall the critic's gradient with respect to its input is zero: the gradient penalty
    ``mean((||grad D|| - 1)^2)`` sits at 1, the critic scores real and generated images alike, and the generator
    gets no adversarial signal, so training runs on without learning. Read from the loss terms training already
    computes: an iteration is *flat* when ``|gp - 1| < gp_band`` and the mean input-gradient norm ``d_grad_norm`` is
    below ``max_grad_norm``; ``window`` flat iterations in a row (read every ``check_every`` iterations) are a
    stall. Every start of training has a short flat phase; a stall is one that lasts.

    ``state_dict`` / ``load_state_dict`` carry the detector's state (put it into the training checkpoint for an
    exact resume); :meth:`record` gives ``critic_stalls`` (``[first flat iteration, end or None]`` per stall; the
    end is the first iteration seen out of it, or with a remedy the first one after the remedy),
    ``critic_stall_iterations`` (flat iterations within stalls) and ``critic_stall_remedies`` (times ``on_stall``
    ran), which the model savers write into the model's settings and evaluation copies to ``metrics.json``.

    Args:
        window: flat iterations in a row that make a stall.
        check_every: iterations between two reads of the loss terms (each read waits for the device).
        gp_band: how close to 1 the gradient penalty must be.
        max_grad_norm: the largest mean input-gradient norm of a flat iteration.
        summary_writer: TensorBoard ``SummaryWriter`` for the scalar ``critic_stalled`` (1 in a stall, else 0);
            None: no TensorBoard scalar.
        on_stall: a remedy called with the engine when a stall is detected (e.g. :class:`RestartCritic`); the stall
            then counts as ended at that iteration and a new one needs another ``window`` flat iterations. None
            (the default): only warn.
    """

    def __init__(
        self,
        window: int = 200,
        check_every: int = 10,
        gp_band: float = 0.05,
        max_grad_norm: float = 0.05,
        summary_writer: Any = None,
        on_stall: Any = None,
    ) -> None:
        if window < check_every or check_every < 1:
            raise ValueError(f"window ({window}) must be at least check_every ({check_every}), which must be >= 1.")
        self.window, self.check_every = window, check_every
        self.gp_band, self.max_grad_norm = gp_band, max_grad_norm
        self.summary_writer = summary_writer
        self.on_stall = on_stall
        self.remedies = 0  # times on_stall was applied
        self.flat_since: int | None = None  # first iteration of the current flat run
        self.stalls: list[list[int | None]] = []
        self.last_checked = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self)

    @property
    def stalled(self) -> bool:
        return bool(self.stalls) and self.stalls[-1][1] is None

    def __call__(self, engine: Engine) -> None:
        output, iteration = engine.state.output, engine.state.iteration
        self.last_checked = iteration
        gp, norm = float(output["gp"]), float(output["d_grad_norm"])
        flat = abs(gp - 1.0) < self.gp_band and norm < self.max_grad_norm
        if flat:
            if self.flat_since is None:
                self.flat_since = iteration - self.check_every + 1
            if not self.stalled and iteration - self.flat_since + 1 >= self.window:
                self.stalls.append([self.flat_since, None])
                if self.on_stall is not None:
                    self.on_stall(engine)
                    self.remedies += 1
                    self.stalls[-1][1] = iteration + 1  # the next iteration has the remedy's critic
                    self.flat_since = None
                    logger.warning(
                        f"critic stalled: iterations {self.stalls[-1][0]}-{iteration} had gradient penalty {gp:.3f} "
                        f"(about 1) and critic input-gradient norm {norm:.2g} (about 0); applied the remedy "
                        f"{type(self.on_stall).__name__} (time {self.remedies})."
                    )
                else:
                    logger.warning(
                        f"critic stalled: iterations {self.flat_since}-{iteration} had gradient penalty {gp:.3f} "
                        f"(about 1) and critic input-gradient norm {norm:.2g} (about 0), so the generator learns "
                        "nothing from the critic. Stalls often end by themselves; if this one lasts past half of "
                        "--iterations, train again with --d_init kaiming and --critic_restart_on_stall true (both "
                        "on in the cpu preset). The TensorBoard scalar critic_stalled shows it, and the model's "
                        "settings and evaluation metrics.json record it (critic_stalls)."
                    )
        else:
            if self.stalled:
                self.stalls[-1][1] = iteration
                logger.info(
                    f"critic left its stall at iteration {iteration} after {iteration - self.stalls[-1][0]} iterations"
                )
            self.flat_since = None
        if self.summary_writer is not None:
            self.summary_writer.add_scalar("critic_stalled", float(self.stalled), iteration)

    def record(self) -> dict[str, Any]:
        """``{"critic_stalls": [[start, end or None], ...], "critic_stall_iterations": int, "critic_stall_remedies":
        int}`` (for the settings)."""
        lengths = [(end if end is not None else self.last_checked + 1) - start for start, end in self.stalls]
        return {
            "critic_stalls": [list(s) for s in self.stalls],
            "critic_stall_iterations": sum(lengths),
            "critic_stall_remedies": self.remedies,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "flat_since": self.flat_since,
            "stalls": [list(s) for s in self.stalls],
            "last_checked": self.last_checked,
            "remedies": self.remedies,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.flat_since, self.last_checked = state["flat_since"], state["last_checked"]
        self.remedies = state.get("remedies", 0)
        self.stalls = [list(s) for s in state["stalls"]]


class RestartCritic:
    """Stall remedy: re-initialise the critic (its ``reset_parameters``, which keeps the critic's chosen
    initialisation, else each layer's own; drawn from torch's random stream) and zero its optimiser's state (Adam's
    moments and step count), in place, so that CUDA graphs and checkpoints keep pointing at the same tensors. The
    generator keeps what it learnt. A fresh critic with the default initialisation starts flat again (see
    :class:`~bundle.networks.SAGANCritic`'s ``init``). In multi-process training it only warns (each process would
    decide from its own losses and restart another critic).

    Args:
        critic: the critic network.
        optimizer: its optimiser.
    """

    def __init__(self, critic: nn.Module, optimizer: Optimizer) -> None:
        self.critic, self.optimizer = critic, optimizer

    def __call__(self, engine: Engine | None = None) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # the ranks would restart different critics: only report
                logger.warning(
                    "critic_restart_on_stall is not applied in multi-process training: the critic keeps its weights."
                )
                return
        critic = getattr(self.critic, "module", self.critic)  # a DataParallel-like wrapper
        with torch.no_grad():
            if callable(getattr(critic, "reset_parameters", None)):
                critic.reset_parameters()
            else:
                for module in critic.modules():
                    if callable(getattr(module, "reset_parameters", None)) and any(module.parameters(recurse=False)):
                        module.reset_parameters()
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()
