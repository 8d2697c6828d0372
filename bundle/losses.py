# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""WGAN-GP losses of SAGAN (paper, Sec. 2.1, Eq. 3-7)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["critic_input_gradient_norms", "gradient_penalty", "critic_loss_terms", "generator_loss_terms"]


def critic_input_gradient_norms(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """||grad D(x_hat)||_2 per sample, x_hat = a * real + (1 - a) * fake with one a ~ U(0, 1) per sample; the norm is
    over the flattened image, kept in the graph (``create_graph``) for the penalty. ``real``, ``fake``:
    (B, C, H, W); returns (B,)."""
    a = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (a * real + (1 - a) * fake.detach()).requires_grad_(True)
    score = critic(mixed)
    (grad,) = torch.autograd.grad(score, mixed, grad_outputs=torch.ones_like(score), create_graph=True)
    return grad.flatten(1).norm(2, dim=1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """mean((||grad D(x_hat)||_2 - 1)^2) (see :func:`critic_input_gradient_norms`); returns a scalar."""
    return ((critic_input_gradient_norms(critic, real, fake) - 1) ** 2).mean()


def critic_loss_terms(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, lambda_gp: float = 10.0
) -> dict[str, torch.Tensor]:
    """D loss = -mean(D(real)) + mean(D(fake)) + lambda_gp * GP, with ``fake`` detached.

    Real and fake go through the critic as one batch (it has no normalisation, so this equals two passes).
    Returns the scalar terms ``d_real``, ``d_fake``, ``gp``, ``d_loss`` (the one to minimise) and, for monitoring
    only (detached), ``d_grad_norm``: the mean input-gradient norm of the penalty's samples (near 0 while the critic
    is stalled, see :class:`~bundle.handlers.CriticStallDetector`)."""
    scores = critic(torch.cat([real, fake.detach()])).flatten(1).mean(1)
    d_real, d_fake = scores[: real.shape[0]].mean(), scores[real.shape[0] :].mean()
    norms = critic_input_gradient_norms(critic, real, fake)
    gp = ((norms - 1) ** 2).mean()
    d_loss = -d_real + d_fake + lambda_gp * gp
    return {"d_real": d_real, "d_fake": d_fake, "gp": gp, "d_loss": d_loss, "d_grad_norm": norms.detach().mean()}


def generator_loss_terms(
    critic: nn.Module,
    fake: torch.Tensor,
    normal: torch.Tensor,
    normal_restored: torch.Tensor,
    pseudo_restored: torch.Tensor,
    lambda_identity: float = 1.0,
    lambda_restoration: float = 1.0,
) -> dict[str, torch.Tensor]:
    """G loss = -mean(D(fake)) + lambda_identity * mean|x_n - G(x_n)|
    + lambda_restoration * mean((x_n - G(FPI(x_n)))^2).

    Returns the scalar terms ``g_adv``, ``g_identity``, ``g_restoration`` and ``g_loss``."""
    adv = -critic(fake).mean()
    identity = (normal - normal_restored).abs().mean()
    restoration = ((normal - pseudo_restored) ** 2).mean()
    total = adv + lambda_identity * identity + lambda_restoration * restoration
    return {"g_adv": adv, "g_identity": identity, "g_restoration": restoration, "g_loss": total}
