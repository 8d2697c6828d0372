# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""A run interrupted at a checkpoint and resumed ends bitwise equal to the uninterrupted run (CPU, one process):
with the random states in the trainer's checkpointed state and ``ResumablePassSampler``."""

from __future__ import annotations

import torch
from monai.data import DataLoader
from monai.handlers import CheckpointLoader
from monai.utils import set_determinism

from bundle.data import ImageCache, SAGANTrainingDataset
from bundle.engines import ResumablePassSampler, SAGANTrainer, attach_handlers
from bundle.handlers import AtomicCheckpointSaver, latest_checkpoint
from bundle.networks import SAGANCritic, SAGANGenerator
from bundle.transforms import RandForeignPatchInterpolationd


def in_memory(n: int, seed: int) -> ImageCache:
    g = torch.Generator().manual_seed(seed)
    return ImageCache([{"image": torch.rand(1, 32, 32, generator=g) * 2 - 1} for _ in range(n)], transform=lambda d: d)


def build(max_epochs: int) -> SAGANTrainer:
    """6 pairs in batches of 2 (3 batches a pass), 2 iterations an epoch: checkpoints fall in the middle of a pass."""
    set_determinism(seed=0)
    g, d = SAGANGenerator(conv_dim=4, num_res_blocks=1), SAGANCritic(conv_dim=4, num_layers=4)  # keep_prob 0.95
    ds = SAGANTrainingDataset(in_memory(6, 0), in_memory(6, 1), RandForeignPatchInterpolationd(keys="normal"))
    sampler = ResumablePassSampler(ds, seed=0, batch_size=2)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(0))
    trainer = SAGANTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        g_network=g,
        g_optimizer=torch.optim.Adam(g.parameters(), 1e-3),
        d_network=d,
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-3),
        epoch_length=2,
        seed=0,
    )
    return trainer


def checkpoint_dict(t: SAGANTrainer) -> dict:
    return {"g": t.g_network, "d": t.d_network, "g_opt": t.g_optimizer, "d_opt": t.d_optimizer, "trainer": t}


def run(tmp_path, name: str, max_epochs: int, resume_from: str | None = None) -> dict:
    trainer = build(max_epochs)
    handlers = [CheckpointLoader(resume_from, checkpoint_dict(trainer))] if resume_from else []
    handlers.append(AtomicCheckpointSaver(str(tmp_path / name), checkpoint_dict(trainer), save_final=True))
    attach_handlers(trainer, handlers)  # then the sampler's resume hook, after the loader's
    trainer.run()
    return {k: v.state_dict() for k, v in checkpoint_dict(trainer).items() if k != "trainer"}


def flat(state) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in flat(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in flat(v)]
    return [state] if isinstance(state, torch.Tensor) else []


def test_resumed_run_is_bitwise_the_uninterrupted_run(tmp_path):
    full = run(tmp_path, "full", max_epochs=2)  # 4 iterations
    run(tmp_path, "first", max_epochs=1)  # stopped after iteration 2: the middle of the first pass
    resumed = run(tmp_path, "first", max_epochs=2, resume_from=latest_checkpoint(str(tmp_path / "first")))
    for a, b in zip(flat(full), flat(resumed), strict=True):
        assert torch.equal(a, b)
