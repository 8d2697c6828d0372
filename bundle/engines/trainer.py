# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The SAGAN training engine: WGAN-GP on three streams (normal, unlabeled, pseudo anomalies) as a MONAI Trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import AdversarialIterationEvents, set_determinism
from torch import nn
from torch.optim import Optimizer

from ..losses import critic_loss_terms, generator_loss_terms

__all__ = ["SAGANPrepareBatch", "SAGANTrainer", "attach_handlers", "loss_terms", "epochs_for"]

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


def epochs_for(iterations: int, val_interval: int) -> int:
    """The number of engine "epochs" (``val_interval`` iterations each) that make ``iterations``.

    Raises:
        ValueError: ``iterations`` is not a positive multiple of ``val_interval`` (it would be silently cut)."""
    if val_interval < 1 or iterations < val_interval or iterations % val_interval:
        lower, upper = (iterations // val_interval) * val_interval, -(-iterations // val_interval) * val_interval
        raise ValueError(
            f"iterations ({iterations}) must be a positive multiple of val_interval ({val_interval}): validation and "
            f"checkpoints happen every val_interval iterations. Use --iterations {upper}"
            + (f" or {lower}" if lower > 0 else "")
            + " (or change --val_interval)."
        )
    return iterations // val_interval


class SAGANPrepareBatch(PrepareBatch):
    """Takes the three SAGAN streams out of a training batch and moves them to ``device``.

    Returns ``(x_n, x_u, x_p)``: normal images, unlabeled images (``None`` when the batch has none, the paper's
    "0_u" setting) and pseudo-anomalous images FPI(x_n); each (B, C, H, W) in [-1, 1].
    """

    def __init__(self, normal_key: str = "normal", unlabeled_key: str = "unlabeled", pseudo_key: str = "pseudo"):
        self.normal_key, self.unlabeled_key, self.pseudo_key = normal_key, unlabeled_key, pseudo_key

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        def move(key: str) -> torch.Tensor:
            x = batchdata[key]
            x = x.as_tensor() if hasattr(x, "as_tensor") else x
            return x.to(device=device, non_blocking=non_blocking, **kwargs)

        x_u = move(self.unlabeled_key) if self.unlabeled_key in batchdata else None
        return move(self.normal_key), x_u, move(self.pseudo_key)


class SAGANTrainer(Trainer):
    """Runs SAGAN's WGAN-GP recipe (paper, Sec. 2.1, Eq. 3-7), firing MONAI's iteration events so that MONAI
    handlers work.

    ``prepare_batch`` turns each batch into ``(x_n, x_u, x_p)`` (see :class:`SAGANPrepareBatch`): (B, 1, H, W)
    normal, unlabeled and pseudo-anomalous images in [-1, 1].

    - critic step (every iteration): -mean(D(x_n)) + mean(D(G(x_u))) + lambda_gp * GP;
    - generator step (every ``n_critic``-th iteration, on the same batch):
      -mean(D(G(x_u))) + lambda_identity * L1(x_n, G(x_n)) + lambda_restoration * MSE(x_n, G(FPI(x_n))).

    Without unlabeled images (the paper's "0_u" setting) G(FPI(x_n)) plays the fake role.
    On generator iterations x_u, x_n and FPI(x_n) go through G as one batch and G(x_u) is reused by both steps:
    G is not changed by the critic step and instance norm is per sample, so the losses are those of separate
    passes (only the random delta masks differ). ``engine.state.output`` holds every loss term as a detached
    scalar tensor; generator terms keep their last value on critic-only iterations.

    Events: MONAI's ``IterationEvents`` (FORWARD_COMPLETED after the generator pass, LOSS/BACKWARD_COMPLETED for
    the critic step, MODEL_COMPLETED at the end) and, as in MONAI's ``AdversarialTrainer``, the
    ``AdversarialIterationEvents`` of both steps (GENERATOR_FORWARD_COMPLETED, DISCRIMINATOR_LOSS_COMPLETED,
    DISCRIMINATOR_BACKWARD_COMPLETED, DISCRIMINATOR_MODEL_COMPLETED, and on generator iterations
    GENERATOR_LOSS_COMPLETED, GENERATOR_BACKWARD_COMPLETED, GENERATOR_MODEL_COMPLETED).

    Args:
        device, max_epochs, train_data_loader, epoch_length: as for MONAI's ``Trainer`` (an "epoch" here is
            ``epoch_length`` iterations, e.g. the validation interval; the loader restarts when exhausted).
        g_network, g_optimizer, d_network, d_optimizer: generator and critic with their optimisers.
        n_critic: critic steps per generator step.
        lambda_gp, lambda_identity, lambda_restoration: loss weights.
        seed: with a seed, a resumed run reseeds torch, numpy and the data set's random state with
            ``seed + iteration``, so that it does not replay the random draws of the run's start.
        prepare_batch: batch -> ``(x_n, x_u or None, x_p)`` on the device.
        train_handlers: MONAI / ignite handlers to attach.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: nn.Module,
        g_optimizer: Optimizer,
        d_network: nn.Module,
        d_optimizer: Optimizer,
        epoch_length: int | None = None,
        n_critic: int = 2,
        lambda_gp: float = 10.0,
        lambda_identity: float = 1.0,
        lambda_restoration: float = 1.0,
        seed: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        iteration_update: Callable | None = None,
        train_handlers: Sequence | None = None,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch or SAGANPrepareBatch(),
            iteration_update=iteration_update,
            handlers=train_handlers,
            decollate=False,
        )
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}.")
        self.register_events(*AdversarialIterationEvents)
        self.g_network = g_network
        self.d_network = d_network
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

    def _iteration(self, engine: SAGANTrainer, batchdata: dict) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("empty batch from the training data loader.")
        g, d = engine.g_network, engine.d_network
        x_n, x_u, x_p = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        has_unlabeled = x_u is not None
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
                fake = g(x_u if has_unlabeled else x_p)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(AdversarialIterationEvents.GENERATOR_FORWARD_COMPLETED)

        engine.d_optimizer.zero_grad(set_to_none=True)
        d_terms = critic_loss_terms(d, x_n, fake, engine.lambda_gp)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED)
        d_terms["d_loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED)
        engine.d_optimizer.step()
        engine.fire_event(AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED)

        if update_g:
            engine.g_optimizer.zero_grad(set_to_none=True)
            for p in d.parameters():
                p.requires_grad_(False)
            g_terms = generator_loss_terms(d, fake, x_n, g_n, g_p, engine.lambda_identity, engine.lambda_restoration)
            engine.fire_event(AdversarialIterationEvents.GENERATOR_LOSS_COMPLETED)
            g_terms["g_loss"].backward()
            engine.fire_event(AdversarialIterationEvents.GENERATOR_BACKWARD_COMPLETED)
            for p in d.parameters():
                p.requires_grad_(True)
            engine.g_optimizer.step()
            engine.fire_event(AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED)
            engine._last_g_terms = {k: v.detach() for k, v in g_terms.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {**{k: v.detach() for k, v in d_terms.items()}, **engine._last_g_terms}
