# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Test-only recorders and probes for multi-process runs, imported by the torchrun workers through the
``_target_``s of a config merged last (tests/test_multi_gpu.py)."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

from bundle.data import SAGANTrainingDataset
from bundle.distributed import DistributedPassSampler, get_rank
from bundle.losses import critic_loss_terms, gradient_penalty


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class RecordingSampler(DistributedPassSampler):
    """:class:`DistributedPassSampler` that appends ``{"pass", "indices"}`` of every pass to
    ``record_dir/sampler_rank{R}.jsonl``."""

    def __init__(self, *args, record_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir

    def __iter__(self):
        indices = list(super().__iter__())
        _append(
            os.path.join(self.record_dir, f"sampler_rank{self.rank}.jsonl"), {"pass": self.epoch, "indices": indices}
        )
        return iter(indices)


class RecordingDataset(SAGANTrainingDataset):
    """:class:`SAGANTrainingDataset` that appends ``{"index", "donor"}`` (the donor's index in T_n, found by
    comparing images) of every item it serves to ``record_dir/items_rank{R}.jsonl``."""

    def __init__(self, *args, record_dir: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        donor = [j for j in range(len(self.normal)) if torch.equal(item["donor"], self.normal[j]["image"])]
        _append(os.path.join(self.record_dir, f"items_rank{get_rank()}.jsonl"), {"index": index, "donor": donor[0]})
        return item


class ParameterDump:
    """At COMPLETED, saves the state dicts of ``networks`` and the engine's iteration to
    ``record_dir/params_rank{R}.pt`` (on every rank)."""

    def __init__(self, networks: dict[str, nn.Module], record_dir: str) -> None:
        self.networks = networks
        self.record_dir = record_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        state = {k: {n: t.detach().cpu() for n, t in m.state_dict().items()} for k, m in self.networks.items()}
        state["iteration"] = engine.state.iteration
        torch.save(state, os.path.join(self.record_dir, f"params_rank{get_rank()}.pt"))


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in module.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def gradient_penalty_check(ddp_critic: nn.parallel.DistributedDataParallel, image_size: int = 64) -> dict:
    """Whether SAGAN's critic loss (WGAN terms + lambda * GP, ``bundle.losses.critic_loss_terms``) back-propagated
    through a DDP-wrapped critic gives all-reduced gradients; call it on every rank of an initialised group.

    Each rank takes its quarter-batch of a global batch drawn identically on all ranks. The reference is the mean
    over ranks of the gradients of an unwrapped copy, each with that rank's mixing weights a ~ U(0, 1) (same
    seeds): what a correct all-reduce yields. Returns the largest deviations of three variants:

    - ``ddp``: every critic call through ``ddp_critic`` (what the trainer does);
    - ``ddp_gp_unwrapped``: WGAN terms through DDP, the penalty's ``autograd.grad`` through ``.module``;
    - ``unwrapped_only``: nothing through DDP (no all-reduce is triggered: gradients stay rank-local).

    ``ddp_critic``'s gradients are reset to None afterwards.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    critic = ddp_critic.module
    device = next(critic.parameters()).device
    gen = torch.Generator().manual_seed(1)
    real_all = (torch.rand(4 * world_size, 1, image_size, image_size, generator=gen) * 2 - 1).to(device)
    fake_all = (torch.rand(4 * world_size, 1, image_size, image_size, generator=gen) * 2 - 1).to(device)
    real, fake = real_all[4 * rank : 4 * rank + 4], fake_all[4 * rank : 4 * rank + 4]

    def loss_with_seed(net: nn.Module, r: int, gp_net: nn.Module | None = None) -> torch.Tensor:
        torch.manual_seed(100 + r)  # the mixing weights of rank r
        if gp_net is None:
            return critic_loss_terms(net, real_all[4 * r : 4 * r + 4], fake_all[4 * r : 4 * r + 4], 10.0)["d_loss"]
        scores = net(torch.cat([real, fake])).flatten(1).mean(1)
        gp = gradient_penalty(gp_net, real, fake)
        return -scores[:4].mean() + scores[4:].mean() + 10.0 * gp

    reference_net = copy.deepcopy(critic)
    for r in range(world_size):
        loss_with_seed(reference_net, r).backward()
    reference = [g / world_size for g in _grads(reference_net)]
    local_net = copy.deepcopy(critic)
    loss_with_seed(local_net, rank).backward()
    local = _grads(local_net)

    results: dict = {"reference_vs_local": _max_diff(reference, local)}
    for variant in ("ddp", "ddp_gp_unwrapped", "unwrapped_only"):
        critic.zero_grad(set_to_none=True)
        if variant == "ddp":
            loss = loss_with_seed(ddp_critic, rank)
        elif variant == "ddp_gp_unwrapped":
            loss = loss_with_seed(ddp_critic, rank, gp_net=critic)
        else:
            loss = loss_with_seed(critic, rank)
        loss.backward()
        grads = _grads(critic)
        results[variant] = {"vs_reference": _max_diff(grads, reference), "vs_local": _max_diff(grads, local)}
    critic.zero_grad(set_to_none=True)
    return results


class GradientPenaltyProbe:
    """At STARTED, runs :func:`gradient_penalty_check` on the trainer's DDP critic (``ddp_critic``, as built by
    configs/multi_gpu_train.json) and writes the result to ``record_dir/gp_rank{R}.json``."""

    def __init__(self, ddp_critic: nn.parallel.DistributedDataParallel, record_dir: str, image_size: int = 64):
        self.ddp_critic = ddp_critic
        self.record_dir = record_dir
        self.image_size = image_size

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        state = copy.deepcopy(self.ddp_critic.module.state_dict())
        result = gradient_penalty_check(self.ddp_critic, self.image_size)
        self.ddp_critic.module.load_state_dict(state)  # no optimiser step was taken; keep the weights regardless
        with open(os.path.join(self.record_dir, f"gp_rank{get_rank()}.json"), "w") as f:
            json.dump(result, f)
