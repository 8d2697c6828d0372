# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""``share_clean_patches``: on a generator iteration, compute G only on the patches of FPI(x_n) that the pasted
patch reaches and take the others from G(x_n) (a patch's result depends only on the patch and its position, see
:meth:`bundle.networks.SAGANGenerator.forward_patches`). The results equal whole-image passes up to float rounding;
measurements: docs/performance.md, "The trainer's speed switches"."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..networks.generator import split_patches, stitch_patches

__all__ = ["patch_forward", "pad_to_bucket", "touched_patch_plan", "shared_patch_generator_pass"]


def patch_forward(g_network: nn.Module) -> tuple[Callable | None, int]:
    """How to run ``g_network`` on patches with their position indices, and its patches per side N.

    A generator with ``forward_patches`` and ``patches_per_side`` (:class:`~bundle.networks.SAGANGenerator`) gives
    its ``forward_patches``; wrapped in DistributedDataParallel, the wrapper itself (its ``forward(p, positions)``
    reaches ``forward_patches``, and only a call through the wrapper synchronises the gradients). Other generators:
    ``(None, 1)``."""
    module = g_network.module if isinstance(g_network, nn.parallel.DistributedDataParallel) else g_network
    if not all(hasattr(module, a) for a in ("forward_patches", "patches_per_side")):
        return None, 1
    return (g_network if module is not g_network else g_network.forward_patches), module.patches_per_side


def pad_to_bucket(indices: torch.Tensor, bucket: int) -> torch.Tensor:
    """``indices`` (T,) followed by copies of its first entry up to the next multiple of ``bucket`` (T > 0), so that
    a compiled function sees a few fixed lengths instead of every T; the caller drops the extra results."""
    pad = -len(indices) % bucket
    return torch.cat([indices, indices[:1].expand(pad)]) if pad and len(indices) else indices


def touched_patch_plan(
    p_n: torch.Tensor, p_p: torch.Tensor, bucket: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which FPI(x_n) patches the generator must compute (``share_clean_patches``) and where their results go.

    ``p_n``, ``p_p``: (P, C, h, w) patches of x_n and FPI(x_n). Returns ``(computed, dest)``, both (T,) indices
    into the P patches: ``computed`` are the patches the pasted patch reaches, ``dest`` where each result is
    written. With ``bucket`` the count is padded up to a multiple of ``bucket`` (copies of the first touched patch,
    written to the spare row P, which the caller drops): a few fixed shapes for compiled code and CUDA graphs.
    Finding the touched patches waits for the device (``nonzero``)."""
    touched = (p_p != p_n).flatten(1).any(1).nonzero().squeeze(1)
    if bucket is None:
        return touched, touched
    computed = pad_to_bucket(touched, bucket)
    spare = torch.full((len(computed) - len(touched),), len(p_n), dtype=touched.dtype, device=touched.device)
    return computed, torch.cat([touched, spare])


def shared_patch_generator_pass(
    g_patches: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n: int,
    x_n: torch.Tensor,
    x_u: torch.Tensor | None,
    x_p: torch.Tensor,
    plan: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G(x_u) (or G(x_p) without unlabeled images), G(x_n) and G(x_p), each (B, C, H, W), from one patch pass.

    ``g_patches``: the generator on patches with their position indices (:func:`patch_forward`); ``n``: its patches
    per side; ``plan``: :func:`touched_patch_plan` of x_n's and x_p's patches. Only the touched patches of x_p go
    through ``g_patches``; the others are G(x_n)'s."""
    b, k = x_n.shape[0], n * n
    computed, dest = plan
    p_n, p_p = split_patches(x_n, n), split_patches(x_p, n)
    every = torch.arange(b * k, device=x_n.device) % k
    parts, positions = [p_n, p_p[computed]], [every, computed % k]
    if x_u is not None:
        parts, positions = [split_patches(x_u, n)] + parts, [every] + positions
    out = g_patches(torch.cat(parts), torch.cat(positions))
    r_u, r_n, r_touched = out.split([b * k if x_u is not None else 0, b * k, len(computed)])
    # padding results land in the spare last row (see touched_patch_plan), which is dropped
    r_p = torch.cat([r_n, r_n[:1]]).index_copy(0, dest, r_touched)[: b * k]
    g_n, g_p = stitch_patches(r_n, n), stitch_patches(r_p, n)
    return (stitch_patches(r_u, n) if x_u is not None else g_p), g_n, g_p
