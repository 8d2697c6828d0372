# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The SAGAN training engine: WGAN-GP on three streams (normal, unlabeled, pseudo anomalies) as a MONAI Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.utils import set_determinism
from torch import nn
from torch.optim import Optimizer

from ..losses import critic_loss_terms, generator_loss_terms

__all__ = ["SAGANTrainer", "attach_handlers", "loss_terms"]

G_TERMS = ("g_loss", "g_adv", "g_identity", "g_restoration")


def loss_terms(output: dict) -> dict[str, float]:
    """StatsHandler / TensorBoard ``output_transform``: every loss term of the last iteration as a float."""
    return {k: float(v) for k, v in output.items() if k.startswith(("d_", "g_", "gp"))}


def attach_handlers(engine: Trainer, handlers: Sequence) -> None:
    """Attach handlers after the engine exists: checkpoint handlers save the trainer itself, which a config
    cannot reference while building the trainer's own handler list."""
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)


class SAGANTrainer(Trainer):
    """Runs SAGAN's WGAN-GP recipe, firing MONAI's iteration events so that MONAI handlers work.

    Each iteration takes a batch ``{"normal", "unlabeled", "pseudo"}`` of (B, 1, H, W) images in [-1, 1]:

    - critic step (every iteration): -mean(D(x_n)) + mean(D(G(x_u))) + lambda_gp * GP;
    - generator step (every ``n_critic``-th iteration, on the same batch):
      -mean(D(G(x_u))) + lambda_identity * L1(x_n, G(x_n)) + lambda_restoration * MSE(x_n, G(FPI(x_n))).

    Without ``unlabeled`` in the batch (the paper's "0_u" setting) G(FPI(x_n)) plays the fake role.
    On generator iterations x_u, x_n and FPI(x_n) go through G as one batch and G(x_u) is reused by both steps:
    G is not changed by the critic step and instance norm is per sample, so the losses are those of separate
    passes (only the random delta masks differ). ``engine.state.output`` holds every loss term as a detached
    scalar tensor; generator terms keep their last value on critic-only iterations.

    Args:
        device, max_epochs, train_data_loader, epoch_length: as for MONAI's ``Trainer`` (an "epoch" here is
            ``epoch_length`` iterations, e.g. the validation interval; the loader restarts when exhausted).
        generator, discriminator, g_optimizer, d_optimizer: the networks and their optimisers.
        n_critic: critic steps per generator step.
        lambda_gp, lambda_identity, lambda_restoration: loss weights.
        seed: with a seed, a resumed run reseeds torch, numpy and the data set's random state with
            ``seed + iteration``, so that it does not replay the random draws of the run's start.
        train_handlers: MONAI / ignite handlers to attach.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: Optimizer,
        d_optimizer: Optimizer,
        epoch_length: int | None = None,
        n_critic: int = 2,
        lambda_gp: float = 10.0,
        lambda_identity: float = 1.0,
        lambda_restoration: float = 1.0,
        seed: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable | None = None,
        train_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            handlers=train_handlers,
            decollate=False,
        )
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}.")
        self.generator = generator
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.n_critic = n_critic
        self.lambda_gp = lambda_gp
        self.lambda_identity = lambda_identity
        self.lambda_restoration = lambda_restoration
        self._last_g_terms: dict[str, torch.Tensor] = {k: torch.tensor(float("nan")) for k in G_TERMS}
        self.seed = seed
        self._seeded_run = False
        # EPOCH_STARTED comes after STARTED, where a CheckpointLoader restores the iteration count
        self.add_event_handler(Events.EPOCH_STARTED, self._reseed_if_resumed)

    def _reseed_if_resumed(self, engine: SAGANTrainer) -> None:
        if engine._seeded_run or engine.seed is None:
            return
        engine._seeded_run = True
        if engine.state.iteration > 0:
            seed = engine.seed + engine.state.iteration
            set_determinism(seed=seed)
            set_rnd(engine.data_loader.dataset, seed)
            engine.logger.info(f"resumed at iteration {engine.state.iteration}: random streams reseeded with {seed}")

    def _to_device(self, batch: dict, key: str) -> torch.Tensor:
        x = batch[key]
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.to(self.state.device, non_blocking=self.non_blocking)

    def _iteration(self, engine: SAGANTrainer, batchdata: dict) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("empty batch from the training data loader.")
        g, d = engine.generator, engine.discriminator
        x_n, x_p = engine._to_device(batchdata, "normal"), engine._to_device(batchdata, "pseudo")
        has_unlabeled = "unlabeled" in batchdata
        x_u = engine._to_device(batchdata, "unlabeled") if has_unlabeled else x_p
        update_g = engine.state.iteration % engine.n_critic == 0
        g.train()
        d.train()
        b = x_n.shape[0]

        if update_g:
            restored = g(torch.cat([x_u, x_n, x_p]) if has_unlabeled else torch.cat([x_n, x_p]))
            fake = restored[:b] if has_unlabeled else restored[b:]
            g_n, g_p = (restored[b : 2 * b], restored[2 * b :]) if has_unlabeled else (restored[:b], restored[b:])
        else:
            with torch.no_grad():
                fake = g(x_u)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        engine.d_optimizer.zero_grad(set_to_none=True)
        d_terms = critic_loss_terms(d, x_n, fake, engine.lambda_gp)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        d_terms["d_loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.d_optimizer.step()

        if update_g:
            engine.g_optimizer.zero_grad(set_to_none=True)
            for p in d.parameters():
                p.requires_grad_(False)
            g_terms = generator_loss_terms(d, fake, x_n, g_n, g_p, engine.lambda_identity, engine.lambda_restoration)
            g_terms["g_loss"].backward()
            for p in d.parameters():
                p.requires_grad_(True)
            engine.g_optimizer.step()
            engine._last_g_terms = {k: v.detach() for k, v in g_terms.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {**{k: v.detach() for k, v in d_terms.items()}, **engine._last_g_terms}
