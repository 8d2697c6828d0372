# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""WGAN-GP losses of SAGAN (paper, Sec. 2.1, Eq. 3-7)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "critic_input_gradient_norms",
    "gradient_penalty",
    "critic_loss_terms",
    "generator_loss_terms",
    "SAGANCriticLoss",
    "SAGANGeneratorLoss",
]


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


class SAGANCriticLoss(nn.Module):
    """The critic's WGAN-GP loss with its weight (paper, Sec. 2.1, Eq. 3-7):
    ``d_loss`` = -mean(D(real)) + mean(D(fake)) + lambda_gp * mean((||grad D(x_hat)||_2 - 1)^2),
    x_hat = a * real + (1 - a) * fake, a ~ U(0, 1) per sample (see :func:`critic_loss_terms`).

    The trainer's ``d_loss_function`` (configs/train.json ``critic_loss``). ``forward(critic, real, fake)``:
    ``critic`` maps (B, C, H, W) to scores (B, ...); ``real`` (x_n) and ``fake`` (G(x_u), or G(FPI(x_n)) without
    unlabeled images) are (B, C, H, W) in [-1, 1]. Returns scalar tensors by name: ``d_loss`` (minimised),
    ``d_real``, ``d_fake``, ``gp`` and ``d_grad_norm`` (detached), all logged.

    Args:
        lambda_gp: weight of the gradient penalty (10 in the paper).
    """

    def __init__(self, lambda_gp: float = 10.0) -> None:
        super().__init__()
        self.lambda_gp = lambda_gp

    def forward(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        return critic_loss_terms(critic, real, fake, self.lambda_gp)


class SAGANGeneratorLoss(nn.Module):
    """The generator's loss with its weights (paper, Sec. 2.1, Eq. 3-7):
    ``g_loss`` = -mean(D(G(x_u))) + lambda_identity * mean|x_n - G(x_n)|
    + lambda_restoration * mean((x_n - G(FPI(x_n)))^2): the adversarial, identity and restoration terms
    (see :func:`generator_loss_terms`).

    The trainer's ``g_loss_function`` (configs/train.json ``generator_loss``).
    ``forward(critic, fake, normal, normal_restored, pseudo_restored)``: ``critic`` maps (B, C, H, W) to scores
    (B, ...); ``fake`` G(x_u) (or G(FPI(x_n)) without unlabeled images), ``normal`` x_n, ``normal_restored``
    G(x_n) and ``pseudo_restored`` G(FPI(x_n)) are (B, C, H, W) in [-1, 1]. Returns scalar tensors by name:
    ``g_loss`` (minimised), ``g_adv``, ``g_identity`` and ``g_restoration``, all logged.

    Args:
        lambda_identity: weight of the identity term (1 in the paper).
        lambda_restoration: weight of the restoration term (1 in the paper).
    """

    def __init__(self, lambda_identity: float = 1.0, lambda_restoration: float = 1.0) -> None:
        super().__init__()
        self.lambda_identity = lambda_identity
        self.lambda_restoration = lambda_restoration

    def forward(
        self,
        critic: nn.Module,
        fake: torch.Tensor,
        normal: torch.Tensor,
        normal_restored: torch.Tensor,
        pseudo_restored: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return generator_loss_terms(
            critic, fake, normal, normal_restored, pseudo_restored, self.lambda_identity, self.lambda_restoration
        )
