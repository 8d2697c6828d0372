# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""SAGAN critic: the PatchGAN-style discriminator of Fixed-Point GAN (paper, Sec. 3.1, "Implementation details",
refs. [9, 23, 30]), trained as a WGAN-GP critic (paper, Sec. 2.1, Eq. 7): a stack of 4x4 stride-2 convs with
LeakyReLU and no normalisation, then a 3x3 conv to one score channel.

``PatchDiscriminator`` is the deprecated former name of :class:`SAGANCritic` (renamed because MONAI has its own
``monai.networks.nets.PatchDiscriminator``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .blocks import conv_block

__all__ = ["SAGANCritic", "PatchDiscriminator"]


class SAGANCritic(nn.Module):
    """WGAN critic. Default arguments are the paper preset (44,719,040 parameters).

    Args:
        in_channels: image channels.
        conv_dim: width of the first conv; each further conv doubles it.
        num_layers: number of 4x4 stride-2 convs (each halves the spatial size).
        negative_slope: LeakyReLU slope.
        init: ``"default"`` (PyTorch's layer initialisation, as published) or ``"kaiming"`` (He-normal weights for
            the LeakyReLU slope, zero biases: a deviation). With the default one the critic's input gradient starts
            near zero (mean norm about 3e-4 at the ``cpu`` preset's widths against about 0.17 with ``"kaiming"``),
            the gradient penalty sits at 1, and in some seeds the critic never leaves that flat start (the stall
            :class:`~bundle.handlers.CriticStallDetector` reports).

    ``forward`` takes (B, C, H, W) (images in [-1, 1]) and returns the critic map
    (B, 1, H / 2**num_layers, W / 2**num_layers) of unbounded scores (1x1 at 64x64 with the defaults).

    ``hparams`` holds the constructor arguments (a JSON-able dict).
    """

    # a dict of mixed value types has no TorchScript type; it is bookkeeping, not used by forward
    __jit_ignored_attributes__ = ["hparams"]

    def __init__(
        self,
        in_channels: int = 1,
        conv_dim: int = 64,
        num_layers: int = 6,
        negative_slope: float = 0.01,
        init: str = "default",
    ):
        super().__init__()
        if init not in ("default", "kaiming"):
            raise ValueError(f"init must be 'default' or 'kaiming', got {init!r}.")
        self.hparams = {
            "in_channels": in_channels,
            "conv_dim": conv_dim,
            "num_layers": num_layers,
            "negative_slope": negative_slope,
            "init": init,
        }
        layers: list[nn.Module] = []
        cin, cout = in_channels, conv_dim
        for _ in range(num_layers):
            act = ("leakyrelu", {"negative_slope": negative_slope})
            layers.append(conv_block(cin, cout, 4, stride=2, bias=True, norm=None, act=act))
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, 1, kernel_size=3, padding=1, bias=False))
        self.net = nn.Sequential(*layers)
        if init == "kaiming":
            self._kaiming_init()

    def _kaiming_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=self.hparams["negative_slope"], nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def reset_parameters(self) -> None:
        """Draws new weights in place, with the initialisation chosen at construction."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        if self.hparams["init"] == "kaiming":
            self._kaiming_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(SAGANCritic):
    """Deprecated alias of :class:`SAGANCritic` (same arguments, same state dict); warns on construction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn(
            "bundle.networks.PatchDiscriminator is deprecated, use bundle.networks.SAGANCritic (same arguments and "
            "weights); in configs set discriminator_def#_target_ to 'bundle.networks.SAGANCritic'.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(*args, **kwargs)
