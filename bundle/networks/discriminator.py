# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""SAGAN critic (SPEC.md, "Discriminator"): a stack of 4x4 stride-2 convs with LeakyReLU, no normalisation."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_block

__all__ = ["PatchDiscriminator"]


class PatchDiscriminator(nn.Module):
    """WGAN critic. Default arguments are the paper preset (44,719,040 parameters).

    Args:
        in_channels: image channels.
        conv_dim: width of the first conv; each further conv doubles it.
        num_layers: number of 4x4 stride-2 convs (each halves the spatial size).
        negative_slope: LeakyReLU slope.

    ``forward`` takes (B, C, H, W) and returns the critic map (B, 1, H / 2**num_layers, W / 2**num_layers)
    of unbounded scores (1x1 at 64x64 with the defaults).
    """

    def __init__(self, in_channels: int = 1, conv_dim: int = 64, num_layers: int = 6, negative_slope: float = 0.01):
        super().__init__()
        layers: list[nn.Module] = []
        cin, cout = in_channels, conv_dim
        for _ in range(num_layers):
            act = ("leakyrelu", {"negative_slope": negative_slope})
            layers.append(conv_block(cin, cout, 4, stride=2, bias=True, norm=None, act=act))
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, 1, kernel_size=3, padding=1, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
