# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The SAGAN training engine: WGAN-GP on three streams (normal, unlabeled, pseudo anomalies) as a MONAI Trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import AdversarialIterationEvents, set_determinism
from torch import nn
from torch.optim import Optimizer

from ..acceleration.patch_sharing import patch_forward, shared_patch_generator_pass, touched_patch_plan
from ..checks import require_autocast_dtype, require_bool
from ..environment import cpu_has_native_bf16
from ..losses import SAGANCriticLoss, SAGANGeneratorLoss
from ..networks.generator import split_patches
from .cuda_graphs import CUDAGraphIterations, check_cuda_graphs, release_optimizer_from_capture
from .resumable import ResumablePassSampler, random_states, set_random_states

__all__ = ["SAGANPrepareBatch", "SAGANTrainer", "attach_handlers", "loss_terms", "epochs_for"]


def loss_terms(output: dict[str, torch.Tensor]) -> dict[str, float]:
    """StatsHandler / TensorBoard / MLflow ``output_transform``: every loss term of the last iteration (every term
    the trainer's loss functions returned, see :class:`SAGANTrainer`) as a float."""
    return {k: float(v) for k, v in output.items()}


def attach_handlers(engine: Trainer, handlers: Sequence) -> None:
    """Attach handlers after the engine exists: checkpoint handlers save the trainer itself, which a config
    cannot reference while building the trainer's own handler list. Then the data loader's
    :class:`ResumablePassSampler` resume hook (after a CheckpointLoader's, which restores the iteration)."""
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)
    sampler = getattr(getattr(engine, "data_loader", None), "sampler", None)
    if isinstance(sampler, ResumablePassSampler):
        sampler.attach(engine)


def check_loader_has_batches(loader: Iterable) -> None:
    """Refuses a training ``DataLoader`` that yields no batch, which ignite would run as a "completed" run of zero
    iterations (an untrained generator, saved and evaluated as if trained).

    Raises:
        ValueError: ``len(loader)`` is 0, e.g. fewer training pairs than ``batch_size`` with ``drop_last``."""
    if not isinstance(loader, torch.utils.data.DataLoader) or len(loader) > 0:
        return
    pairs = len(loader.dataset)
    if pairs == 0:
        raise ValueError("the training data loader yields no batch: the training set is empty.")
    raise ValueError(
        f"the training data loader yields no batch: {pairs} training pairs (the larger of the normal and the "
        f"unlabeled training sets) and batch_size {loader.batch_size} with drop_last, so no full batch can be formed. "
        f"Use a batch_size of at most {pairs} (e.g. --batch_size {pairs}) or add training images."
    )


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


class _FloatScores(nn.Module):
    """Wraps the critic under autocast: (B, C, H, W) -> its score map in float32, so that the losses are float32
    sums."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).float()


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

    - critic step (every iteration): ``d_loss_function``, by default -mean(D(x_n)) + mean(D(G(x_u))) + lambda_gp * GP
      (:class:`~bundle.losses.SAGANCriticLoss`);
    - generator step (every ``n_critic``-th iteration, on the same batch): ``g_loss_function``, by default
      -mean(D(G(x_u))) + lambda_identity * L1(x_n, G(x_n)) + lambda_restoration * MSE(x_n, G(FPI(x_n)))
      (:class:`~bundle.losses.SAGANGeneratorLoss`).

    Without unlabeled images (the paper's "0_u" setting) G(FPI(x_n)) plays the fake role.
    On generator iterations x_u, x_n and FPI(x_n) go through G as one batch and G(x_u) is reused by both steps:
    G is not changed by the critic step and instance norm is per sample, so the losses are those of separate
    passes (only the random delta masks differ). ``engine.state.output`` holds every term the loss functions
    returned, as detached scalar tensors: the critic's of this iteration and, from the first generator step on, the
    generator's of the last one (they keep their value on critic-only iterations).

    Speed switches (all off by default; what each changes and its measurements: docs/performance.md, "The
    trainer's speed switches"): ``share_clean_patches`` (patches of FPI(x_n) that the pasted patch misses are taken
    from G(x_n) instead of recomputed; needs a generator with ``forward_patches`` and ``patches_per_side``, others
    run without it, with a warning), ``channels_last`` / ``critic_channels_last`` (memory layout of the networks),
    ``autocast_dtype`` (forward passes under ``torch.autocast``, losses in float32), ``compile_generator``
    (``torch.compile``) and ``cuda_graphs`` (each kind of iteration captured as a CUDA graph by
    :class:`~bundle.engines.CUDAGraphIterations` and replayed; CUDA only, not under DistributedDataParallel, not with
    ``compile_generator``). With every switch off an iteration is the recipe above, step by step.

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
        critic_warmup_iterations, critic_warmup_n_critic: a critic warm-up (a stall remedy, off by default): during
            the first ``critic_warmup_iterations`` iterations the generator steps only every
            ``critic_warmup_n_critic``-th iteration, so the critic learns a useful gradient before the generator
            moves (the original WGAN schedule trained the critic more at the start for the same reason).
        d_loss_function: ``(critic, x_n, fake) -> terms``, the critic's loss: ``critic`` maps (B, C, H, W) to
            scores, ``x_n`` and ``fake`` (G(x_u), or G(FPI(x_n)) without unlabeled images) are (B, C, H, W), and
            ``terms`` are scalar tensors by name, the one to minimise under ``d_loss``. Default:
            :class:`~bundle.losses.SAGANCriticLoss` with the paper's weight.
        g_loss_function: ``(critic, fake, x_n, G(x_n), G(FPI(x_n))) -> terms``, the generator's loss, images
            (B, C, H, W), the term to minimise under ``g_loss``. Default: :class:`~bundle.losses.SAGANGeneratorLoss`
            with the paper's weights. Every term of both is logged (:func:`loss_terms`); critic and generator
            term names must differ.
        seed: with a seed, a resumed run whose checkpoint holds no random states (older checkpoints) reseeds
            torch, numpy and the data set's random state with ``seed + iteration``, so that it does not replay the
            random draws of the run's start. The trainer's ``state_dict`` holds every random state (torch, numpy,
            Python, the data set's), and a resumed run restores them: with the data loader's
            :class:`bundle.engines.ResumablePassSampler` it continues exactly as the uninterrupted run.
        prepare_batch: batch -> ``(x_n, x_u or None, x_p)`` on the device.
        train_handlers: MONAI / ignite handlers to attach.
        share_clean_patches, channels_last, critic_channels_last, autocast_dtype, compile_generator, cuda_graphs:
            speed switches, see above.
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
        critic_warmup_iterations: int = 0,
        critic_warmup_n_critic: int = 5,
        d_loss_function: Callable[..., dict[str, torch.Tensor]] | None = None,
        g_loss_function: Callable[..., dict[str, torch.Tensor]] | None = None,
        seed: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable | None = None,
        iteration_update: Callable | None = None,
        train_handlers: Sequence | None = None,
        share_clean_patches: bool = False,
        channels_last: bool = False,
        critic_channels_last: bool = False,
        autocast_dtype: str | None = None,
        compile_generator: bool = False,
        cuda_graphs: bool = False,
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
        if n_critic < 1 or critic_warmup_n_critic < 1:
            raise ValueError(
                f"n_critic and critic_warmup_n_critic must be >= 1, got {n_critic}, {critic_warmup_n_critic}."
            )
        if critic_warmup_iterations < 0:
            raise ValueError(f"critic_warmup_iterations must be >= 0, got {critic_warmup_iterations}.")
        check_loader_has_batches(train_data_loader)
        require_bool(
            share_clean_patches=share_clean_patches,
            channels_last=channels_last,
            critic_channels_last=critic_channels_last,
            compile_generator=compile_generator,
            cuda_graphs=cuda_graphs,
        )
        require_autocast_dtype("autocast_dtype", autocast_dtype)
        if autocast_dtype is not None and torch.device(self.state.device).type == "cpu" and not cpu_has_native_bf16():
            self.logger.warning(
                "autocast_dtype bfloat16 on a CPU without bf16 instructions (AVX-512 BF16, AMX, Arm BF16) or whose "
                "flags cannot be read: oneDNN emulates bf16 there, which is likely slower than float32."
            )
        self.register_events(*AdversarialIterationEvents)
        self.g_network = g_network
        self.d_network = d_network
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.n_critic = n_critic
        self.critic_warmup_iterations = critic_warmup_iterations
        self.critic_warmup_n_critic = critic_warmup_n_critic
        self.d_loss_function = d_loss_function if d_loss_function is not None else SAGANCriticLoss()
        self.g_loss_function = g_loss_function if g_loss_function is not None else SAGANGeneratorLoss()
        self._last_g_terms: dict[str, torch.Tensor] = {}
        self.seed = seed
        self._seeded_run = False
        self._restored_random_states = False
        # EPOCH_STARTED comes after STARTED, where a CheckpointLoader restores the iteration count
        self.add_event_handler(Events.EPOCH_STARTED, self._reseed_if_resumed)

        self.share_clean_patches = share_clean_patches
        self._g_patches, self._patches_per_side = patch_forward(g_network)
        if share_clean_patches and self._g_patches is None:
            self.logger.warning(
                f"share_clean_patches: {type(g_network).__name__} cannot run on patches (no forward_patches / "
                "patches_per_side); every FPI(x_n) image goes through the generator."
            )
            self.share_clean_patches = False
        self.channels_last = channels_last
        self.critic_channels_last = critic_channels_last
        # no-ops when the config placed the networks so (before a DistributedDataParallel wrapper is built)
        if channels_last:
            g_network.to(memory_format=torch.channels_last)
        if critic_channels_last:
            d_network.to(memory_format=torch.channels_last)
        # a resumed optimiser state keeps the layout it was saved in; fused optimisers need the parameters' one
        self._states_aligned = False
        self.add_event_handler(Events.EPOCH_STARTED, self._align_optimizer_states)
        self.autocast_dtype = autocast_dtype
        self._g_forward: Callable = g_network
        self.pad_touched_patches = compile_generator or cuda_graphs  # a few fixed shapes
        self._graphs: CUDAGraphIterations | None = None
        if cuda_graphs:
            check_cuda_graphs(self.state.device, (g_network, d_network), compile_generator)
            self._graphs = CUDAGraphIterations(
                self.training_step, (g_optimizer, d_optimizer), self.fire_event, self.state.device
            )
        if compile_generator:
            self._g_forward = torch.compile(g_network)
            if self._g_patches is not None:
                self._g_patches = torch.compile(self._g_patches, dynamic=False)

    def state_dict(self) -> dict:
        """The engine's state and every random state of the run (see ``seed``)."""
        state = super().state_dict()
        state["random_states"] = random_states(getattr(self.data_loader, "dataset", None))
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        states = state_dict.pop("random_states", None)
        super().load_state_dict(state_dict)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if states is not None and not (distributed and torch.distributed.get_world_size() > 1):
            # (with several processes only rank 0's states are saved: the ranks keep their reseeded streams)
            set_random_states(states, getattr(self.data_loader, "dataset", None))
            self._restored_random_states = True
            self.logger.info(f"resumed at iteration {self.state.iteration}: random states restored from the checkpoint")

    def _reseed_if_resumed(self, engine: SAGANTrainer) -> None:
        if engine._seeded_run or engine.seed is None or engine._restored_random_states:
            return
        engine._seeded_run = True
        if engine.state.iteration > 0:
            seed = engine.seed + engine.state.iteration
            set_determinism(seed=seed)
            set_rnd(engine.data_loader.dataset, seed)
            engine.logger.info(f"resumed at iteration {engine.state.iteration}: random streams reseeded with {seed}")

    def _align_optimizer_states(self, engine: SAGANTrainer) -> None:
        """Once per run, after a CheckpointLoader: give every optimiser state tensor the memory layout of its
        parameter (PyTorch's fused Adam walks both as flat memory, so a state restored from a checkpoint saved in
        the other layout, ``channels_last`` switched between runs, would be read in the wrong order), and, without
        CUDA graphs, undo a graph run's optimiser set-up restored from its checkpoint (graphs set it up at capture)."""
        if engine._states_aligned:
            return
        engine._states_aligned = True
        for opt in (engine.g_optimizer, engine.d_optimizer):
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p, {})
                    for key, value in state.items():
                        if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                            state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
            if engine._graphs is None:
                release_optimizer_from_capture(opt)

    def _autocast(self, device: torch.device | str | None) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = torch.device(device).type if device is not None else "cpu"
        # a CUDA graph must not keep autocast's weight casts from the capture (they would not be redone at replay)
        return torch.autocast(
            device_type, dtype=getattr(torch, self.autocast_dtype), cache_enabled=self._graphs is None
        )

    def patch_plan(self, x_n: torch.Tensor, x_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``share_clean_patches`` plan of a batch (:func:`touched_patch_plan`; padded for compiled code and
        CUDA graphs), or ``None`` when every FPI(x_n) image goes through the generator."""
        if not self.share_clean_patches:
            return None
        n = self._patches_per_side
        bucket = -(-x_n.shape[0] * n * n // 4) if self.pad_touched_patches else None
        return touched_patch_plan(split_patches(x_n, n), split_patches(x_p, n), bucket)

    def _generator_pass(
        self,
        x_n: torch.Tensor,
        x_u: torch.Tensor | None,
        x_p: torch.Tensor,
        plan: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """G(x_u) (or G(x_p) without unlabeled images: the critic's fake), G(x_n) and G(x_p), with the graph for
        the generator step; each (B, C, H, W). ``plan``: see :meth:`patch_plan`."""
        b = x_n.shape[0]
        has_unlabeled = x_u is not None
        if plan is None:
            restored = self._g_forward(torch.cat([x_u, x_n, x_p]) if has_unlabeled else torch.cat([x_n, x_p]))
            fake = restored[:b] if has_unlabeled else restored[b:]
            g_n, g_p = (restored[b : 2 * b], restored[2 * b :]) if has_unlabeled else (restored[:b], restored[b:])
            return fake, g_n, g_p
        return shared_patch_generator_pass(self._g_patches, self._patches_per_side, x_n, x_u, x_p, plan)

    def _iteration(self, engine: SAGANTrainer, batchdata: dict) -> dict[str, torch.Tensor]:
        if batchdata is None:
            raise ValueError("empty batch from the training data loader.")
        x_n, x_u, x_p = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        update_g = engine.generator_step_due(engine.state.iteration)
        engine.g_network.train()
        engine.d_network.train()
        plan = engine.patch_plan(x_n, x_p) if update_g else None
        if engine._graphs is not None:
            d_terms, g_terms = engine._graphs.run(x_n, x_u, x_p, update_g, plan)
        else:
            d_terms, g_terms = engine.training_step(x_n, x_u, x_p, update_g, plan, engine.fire_event)
        if g_terms is not None:
            engine._last_g_terms = {k: v.detach() for k, v in g_terms.items()}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return {**{k: v.detach() for k, v in d_terms.items()}, **engine._last_g_terms}

    def generator_step_due(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (1-based) also steps the generator: every ``n_critic``-th iteration, every
        ``critic_warmup_n_critic``-th during the critic warm-up."""
        in_warmup = iteration <= self.critic_warmup_iterations
        return iteration % (self.critic_warmup_n_critic if in_warmup else self.n_critic) == 0

    def training_step(
        self,
        x_n: torch.Tensor,
        x_u: torch.Tensor | None,
        x_p: torch.Tensor,
        update_g: bool,
        plan: tuple[torch.Tensor, torch.Tensor] | None,
        fire: Callable[[object], None],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """One iteration's device work: the generator pass, the critic step and, if ``update_g``, the generator
        step (with both optimiser steps). No host synchronisation, so that it can be captured as a CUDA graph.

        ``x_n``, ``x_u`` (or ``None``), ``x_p``: (B, C, H, W) on the device; ``plan``: see :meth:`patch_plan`;
        ``fire``: called with each iteration event in order. Returns the critic's and the generator's loss terms
        (scalar tensors; ``None`` for the generator on critic-only iterations)."""
        d = self.d_network
        has_unlabeled = x_u is not None
        critic = d if self.autocast_dtype is None else _FloatScores(d)
        device = self.state.device
        if update_g:
            with self._autocast(device):
                fake, g_n, g_p = self._generator_pass(x_n, x_u, x_p, plan)
        else:
            with torch.no_grad(), self._autocast(device):
                fake = self._g_forward(x_u if has_unlabeled else x_p)
        if self.autocast_dtype is not None:  # the losses in float32
            fake = fake.float()
            if update_g:
                g_n, g_p = g_n.float(), g_p.float()
        fire(IterationEvents.FORWARD_COMPLETED)
        fire(AdversarialIterationEvents.GENERATOR_FORWARD_COMPLETED)

        self.d_optimizer.zero_grad(set_to_none=True)
        with self._autocast(device):
            d_terms = self.d_loss_function(critic, x_n, fake)
        fire(IterationEvents.LOSS_COMPLETED)
        fire(AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED)
        d_terms["d_loss"].backward()
        fire(IterationEvents.BACKWARD_COMPLETED)
        fire(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED)
        self.d_optimizer.step()
        fire(AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED)
        if not update_g:
            return d_terms, None

        self.g_optimizer.zero_grad(set_to_none=True)
        for p in d.parameters():
            p.requires_grad_(False)
        with self._autocast(device):
            g_terms = self.g_loss_function(critic, fake, x_n, g_n, g_p)
        fire(AdversarialIterationEvents.GENERATOR_LOSS_COMPLETED)
        g_terms["g_loss"].backward()
        fire(AdversarialIterationEvents.GENERATOR_BACKWARD_COMPLETED)
        for p in d.parameters():
            p.requires_grad_(True)
        self.g_optimizer.step()
        fire(AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED)
        return d_terms, g_terms
