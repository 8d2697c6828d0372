# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Whole training iterations of :class:`~bundle.engines.SAGANTrainer` as CUDA graphs (``cuda_graphs`` switch).

A paper-preset iteration launches a few thousand small kernels (32 x 32 patches, an instance norm after every
convolution, the gradient penalty's double backward): on a GPU the time goes to launching them from Python, not to
the arithmetic. A CUDA graph records the kernels of one iteration once and replays them with one launch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

__all__ = [
    "CUDAGraphIterations",
    "check_cuda_graphs",
    "prepare_optimizer_for_capture",
    "release_optimizer_from_capture",
]

Terms = dict[str, torch.Tensor]
# (x_n, x_u, x_p, update_g, plan, fire) -> (critic terms, generator terms or None): one iteration's device work
TrainingStep = Callable[..., tuple[Terms, Terms | None]]


def check_cuda_graphs(device: torch.device | str, networks: tuple[torch.nn.Module, ...], compiled: bool) -> None:
    """Raises ``ValueError`` where whole-iteration CUDA graphs cannot run: not a CUDA device, a network wrapped in
    DistributedDataParallel (its gradient all-reduce runs from hooks outside the graph), or a compiled generator
    (``torch.compile`` manages its own graphs)."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA device, got {device}: set cuda_graphs to false.")
    if any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in networks):
        raise ValueError("cuda_graphs does not support DistributedDataParallel (multi_gpu_train.json): set it false.")
    if compiled:
        raise ValueError("cuda_graphs and compile_generator cannot be combined: choose one.")


def prepare_optimizer_for_capture(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Capturable optimiser steps: the step count and the learning rate on the device, so that a replay reads the
    current lr (an ``LRScheduler`` writes a tensor lr in place) instead of the one at capture."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")) and state["step"].device != device:
            state["step"] = state["step"].to(device)


def release_optimizer_from_capture(optimizer: torch.optim.Optimizer) -> None:
    """Undoes :func:`prepare_optimizer_for_capture` (a checkpoint of a CUDA-graph run resumed without graphs, or on
    the CPU, where capturable steps are refused): a float lr and ``capturable`` off."""
    for group in optimizer.param_groups:
        if group.get("capturable"):
            group["capturable"] = False
        if torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])


class _Graph(NamedTuple):
    """One captured iteration: its graph, static inputs and outputs, and the events it fires."""

    graph: torch.cuda.CUDAGraph
    inputs: list
    outputs: tuple
    events: list


class CUDAGraphIterations:
    """Runs a training step (:meth:`~bundle.engines.SAGANTrainer.training_step`) as CUDA graphs, one per kind of
    iteration (critic-only, or generator with a given padded number of touched FPI patches: up to five generator
    kinds with ``share_clean_patches``, for 0, 1/4, 1/2, 3/4 or all of the patches).

    The first ``warmup`` iterations of each kind run eagerly on a side stream (they allocate the optimiser states
    and let cuDNN and cuBLAS set up); the next is captured and replayed, and later ones are replayed: every
    iteration is executed once. Inputs are copied into the graph's static tensors before a replay; the loss terms
    are copies of its static outputs. Random draws (delta masks, the gradient penalty's mixing weights) come from
    PyTorch's graph-safe CUDA generator: a new draw at every replay, from another stream than eager code's.

    Iteration events fire after the replay, in the order the captured iteration fired them. All graphs share one
    memory pool (they never run at the same time; what must outlive a replay is held by a reference).

    Limits: a handler on a mid-iteration event sees the state at the end of the iteration (one that changed
    gradients between backward and step would do nothing), and ``.grad`` outside the graphs is not the last
    iteration's; only the learning rate follows a scheduler (betas, eps and weight decay are fixed at capture);
    parameters and optimiser states must not be replaced after the first capture (a ``CheckpointLoader`` loads
    before it).

    Args:
        step: ``(x_n, x_u, x_p, update_g, plan, fire) -> (critic terms, generator terms or None)``, one iteration's
            device work with no host synchronisation; ``fire`` is called with each iteration event in order.
        optimizers: the optimisers ``step`` steps (made capturable before the first capture).
        fire: called with each iteration event after a replay (the engine's ``fire_event``).
        device: the CUDA device.
        warmup: eager iterations of each kind before its capture.
    """

    def __init__(
        self,
        step: TrainingStep,
        optimizers: Sequence[torch.optim.Optimizer],
        fire: Callable[[object], None],
        device: torch.device | str,
        warmup: int = 2,
    ) -> None:
        self.step = step
        self.optimizers = tuple(optimizers)
        self.fire = fire
        self.warmup = warmup
        self.device = torch.device(device)
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: dict[tuple, int] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self.replays = 0

    def run(
        self,
        x_n: torch.Tensor,
        x_u: torch.Tensor | None,
        x_p: torch.Tensor,
        update_g: bool,
        plan: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[Terms, Terms | None]:
        """One training iteration (see ``step``); returns copies of its loss terms."""
        inputs = [x_n, x_u, x_p, *(plan or ())]
        key = (update_g, *((None,) if t is None else (tuple(t.shape), t.dtype, t.stride()) for t in inputs))
        entry = self._graphs.get(key)
        if entry is None:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] <= self.warmup:
                return self._eager(x_n, x_u, x_p, update_g, plan)
            entry = self._graphs[key] = self._capture(inputs, update_g)
        else:
            for static, value in zip(entry.inputs, inputs):
                if static is not None:
                    static.copy_(value, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        for event in entry.events:
            self.fire(event)
        d_terms, g_terms = entry.outputs
        return _copy(d_terms), _copy(g_terms)

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _eager(self, *args) -> tuple[Terms, Terms | None]:
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = self.step(*args, self.fire)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def _capture(self, inputs: list, update_g: bool) -> _Graph:
        for opt in self.optimizers:
            prepare_optimizer_for_capture(opt, self.device)
        static = [None if t is None else t.clone() for t in inputs]
        x_n, x_u, x_p, *plan = static
        events: list = []
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side_stream()):
            outputs = self.step(x_n, x_u, x_p, update_g, tuple(plan) or None, events.append)
        return _Graph(graph, static, outputs, events)


def _copy(terms: Terms | None) -> Terms | None:
    return None if terms is None else {k: v.detach().clone() for k, v in terms.items()}
