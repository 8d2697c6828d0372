# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Multi-GPU / multi-node training with ``torchrun`` and ``DistributedDataParallel`` (``configs/multi_gpu_train.json``).

Helpers for the config: process-group set-up and teardown, the per-rank device and seed, the sampler that shards
SAGAN's training pairs, an operating point gathered over ranks, and handler attachment gated by rank.

How the three training streams (paper, Sec. 2.1: normal images T_n, unlabeled images T_u, pseudo anomalies
FPI(x_n, donor)) are split over ``W`` processes:

- normal and unlabeled: :class:`bundle.data.SAGANTrainingDataset` pairs ``T_n[i mod |T_n|]`` with
  ``T_u[i mod |T_u|]`` by the pair index ``i``. The pair is the unit of sharding: :class:`DistributedPassSampler`
  deals each rank a disjoint ``1/W`` of the pair indices of a shared random permutation, redrawn at every pass
  over the data (``set_epoch(pass)``), so ranks never see the same pair within a pass and the fixed pairing of
  the single-GPU recipe is kept (two independent samplers would re-pair the streams).
- donor of the pseudo anomaly: not an indexed stream but an i.i.d. uniform draw from the whole T_n with the data
  set's RandomState. Each rank seeds that state (and the torch generator used by the gradient penalty and the
  generator's delta masks) with its own :func:`rank_seed`, so the ranks draw independent donors and patches from
  the same distribution as one GPU does. Restricting donors to a rank's shard would change that distribution.

Validation runs on every rank on a disjoint shard of ``val``: MONAI's ROCAUC / AveragePrecision gather their
buffers over ranks and :class:`GatheredOperatingPointHandler` gathers the scores and heat maps, so every rank
computes the AUC, AP and thresholds of the whole ``val`` split. Files, TensorBoard, the progress bar, logs and
MLflow are written by rank 0 only (:func:`handlers_for_this_rank`).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointSaver, ClearMLHandler, MLFlowHandler, StatsHandler, TensorBoardHandler
from torch.utils.data import Dataset, DistributedSampler

from .engines import attach_handlers as attach_all
from .handlers import OperatingPointHandler, RestorationImageHandler

__all__ = [
    "local_device",
    "init_process_group",
    "destroy_process_group",
    "get_rank",
    "get_world_size",
    "is_rank_zero",
    "rank_seed",
    "DistributedPassSampler",
    "GatheredOperatingPointHandler",
    "NullSummaryWriter",
    "RANK_ZERO_ONLY",
    "handlers_for_this_rank",
    "average_loss_terms",
    "attach_handlers",
]

logger = logging.getLogger(__name__)

# Handlers that only write (files, TensorBoard, console, MLflow): attached on rank 0 only. Every other handler
# (CheckpointLoader, LrScheduleHandler, ValidationHandler, ...) runs on every rank, so that the ranks keep the same
# state and meet in the same collective operations; an unknown handler therefore defaults to "every rank".
RANK_ZERO_ONLY: tuple[type, ...] = (
    CheckpointSaver,
    StatsHandler,
    TensorBoardHandler,
    RestorationImageHandler,
    ProgressBar,
    MLFlowHandler,
    ClearMLHandler,
)


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (``LOCAL_RANK`` is set by torchrun), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            "LOCAL_RANK is not set: configs/multi_gpu_train.json must be started by torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m monai.bundle run training "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\" --meta_file metadata.json"
        )
    return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")


def init_process_group(device: torch.device | str, backend: str | None = None, timeout_minutes: float = 30.0) -> None:
    """Join the process group that torchrun describes (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    The backend is NCCL for a CUDA ``device`` and gloo for the CPU unless ``backend`` is given. Ranks other than 0
    then log warnings and errors only. Does nothing if the group already exists.

    Raises:
        RuntimeError: not started by torchrun (no WORLD_SIZE / RANK in the environment), or no torch.distributed.
    """
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: multi-GPU training is not possible.")
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not set: configs/multi_gpu_train.json must be started by torchrun "
            "(torchrun --nproc_per_node N -m monai.bundle run training --config_file "
            "\"['configs/train.json','configs/multi_gpu_train.json']\" ...)."
        )
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if dist.get_rank() > 0:
        logging.disable(logging.INFO)  # every logger, whatever its level: rank 0 speaks for all
    logger.info(
        f"process group: backend {backend}, world size {dist.get_world_size()}, rank 0 on {device}; "
        "logs, checkpoints, TensorBoard and MLflow come from rank 0."
    )


def destroy_process_group() -> None:
    """Leave the process group (the ``finalize`` step); does nothing without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    """True on global rank 0 and without a process group."""
    return get_rank() == 0


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed of rank ``rank`` (default: this process): ``seed`` itself on rank 0 (so that rank 0 starts like a
    one-GPU run), for other ranks a value mixed from ``(seed, rank)`` by NumPy's SeedSequence, in [0, 2**31).

    It seeds the per-rank random streams: the donor draw and FPI patches, the gradient-penalty mixing weights
    and the generator's delta masks. The pair sampler and the unlabeled subset keep the shared ``seed``."""
    rank = get_rank() if rank is None else int(rank)
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), rank]).generate_state(1)[0] >> 1)


class DistributedPassSampler(DistributedSampler):
    """Shards the pair indices of a data set over the ranks, with a new shared permutation at every pass.

    Each pass ``p`` over the data (each ``iter()``) calls ``set_epoch(p)`` and deals rank ``r`` the elements
    ``r, r + W, r + 2W, ...`` of ``randperm(len(dataset))`` seeded with ``seed + p`` (the same on every rank), the
    tail of ``len(dataset) mod W`` indices dropped (``drop_last=True``): the ranks' index sets are disjoint within
    a pass and all of them have the same number of batches.

    The engine's "epochs" are validation intervals, not passes (MONAI's ``Workflow`` calls ``set_epoch`` with the
    engine epoch at each EPOCH_STARTED; the pass count here overrides it when the next pass starts). Attach the
    sampler to the trainer (:func:`attach_handlers` does) so that a resumed run continues at the pass of its
    iteration instead of replaying the first passes.

    Args:
        dataset: the pairs (:class:`bundle.data.SAGANTrainingDataset`).
        seed: the shared shuffling seed (the same on every rank).
        batch_size: the per-rank batch size, to refuse a shard that cannot fill one batch.
        num_replicas, rank: default to the process group's world size and rank.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        batch_size: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=int(seed), drop_last=True)
        if self.num_samples < max(1, batch_size or 1):
            raise ValueError(
                f"{len(dataset)} training pairs over {self.num_replicas} processes give {self.num_samples} pairs "
                f"per process and pass, fewer than one batch ({batch_size}): lower --batch_size or start fewer "
                "processes."
            )
        self.passes = 0

    def __iter__(self):
        self.set_epoch(self.passes)
        self.passes += 1
        return super().__iter__()

    def attach(self, engine: Engine) -> None:
        """Restart at the pass of the engine's iteration when it starts (after a CheckpointLoader restored it)."""
        engine.add_event_handler(Events.STARTED, self._resume)

    def _resume(self, engine: Engine) -> None:
        batches = len(engine.data_loader) if hasattr(engine.data_loader, "__len__") else 0
        self.passes = engine.state.iteration // batches if batches else 0


def _gather(values: list) -> list:
    """The concatenation over ranks (rank order) of each rank's list; ``values`` itself without a group."""
    if get_world_size() == 1:
        return values
    gathered: list[list | None] = [None] * get_world_size()
    dist.all_gather_object(gathered, values)
    return [v for part in gathered for v in part]  # type: ignore[union-attr]


class GatheredOperatingPointHandler(OperatingPointHandler):
    """:class:`bundle.handlers.OperatingPointHandler` for a ``val`` split sharded over ranks: before choosing the
    thresholds it gathers every rank's scores, labels and normal heat maps (CPU, (1, H, W) each), so that all ranks
    compute the operating point of the whole split. Same arguments; attach it on every rank."""

    def _choose(self, engine: Engine) -> None:
        self._scores = _gather(self._scores)
        self._labels = _gather(self._labels)
        self._normal_maps = _gather(self._normal_maps)
        super()._choose(engine)


class NullSummaryWriter:
    """Stands in for TensorBoard's ``SummaryWriter`` on ranks other than 0: every method does nothing (a real
    writer would create an event file at construction)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def handlers_for_this_rank(handlers: Sequence | None) -> list:
    """``handlers`` without ``None`` and, on ranks other than 0, without the writers: instances of
    :data:`RANK_ZERO_ONLY` and handlers whose ``rank_zero_only`` attribute is true."""
    kept = [h for h in handlers or () if h is not None]
    if is_rank_zero():
        return kept
    return [h for h in kept if not (isinstance(h, RANK_ZERO_ONLY) or getattr(h, "rank_zero_only", False))]


def average_loss_terms(engine: Engine) -> None:
    """ITERATION_COMPLETED: replace each scalar tensor of ``engine.state.output`` by its mean over the ranks, so
    that rank 0 logs the loss terms of the global batch (one small all-reduce per iteration)."""
    output = engine.state.output
    if get_world_size() == 1 or not isinstance(output, dict):
        return
    keys = [k for k, v in output.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
    if not keys:
        return
    device = output[keys[0]].device
    values = torch.stack([output[k].detach().reshape(()).to(device, torch.float32) for k in keys])
    dist.all_reduce(values)
    values /= get_world_size()
    engine.state.output = {**output, **dict(zip(keys, values, strict=True))}


def attach_handlers(engine: Engine, handlers: Sequence | None) -> None:
    """The multi-GPU counterpart of :func:`bundle.engines.attach_handlers`: loss-term averaging first (so that the
    loggers see global values), then the handlers this rank runs (:func:`handlers_for_this_rank`), then the data
    loader's :class:`DistributedPassSampler` resume hook (after a CheckpointLoader's). The same order on every rank
    keeps the collective operations of averaging and validation in step."""
    engine.add_event_handler(Events.ITERATION_COMPLETED, average_loss_terms)
    attach_all(engine, handlers_for_this_rank(handlers))
    sampler = getattr(getattr(engine, "data_loader", None), "sampler", None)
    if isinstance(sampler, DistributedPassSampler):
        sampler.attach(engine)
