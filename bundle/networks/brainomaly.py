# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Brainomaly generator, the baseline of the paper's ablation (paper, Sec. 3.3, Table 3, "Baseline [22]") and
one of the compared methods (paper, Sec. 3.2, Table 2).

Re-implemented from the layer list of the authors' code (github.com/mahfuzmohammad/Brainomaly, ``model.py``,
``Generator``, the StarGAN generator without domain labels; ``solver.py`` builds it as
``Generator(g_conv_dim, 0, g_repeat_num)`` with the defaults 64 and 6 of ``main.py``):

    7x7 conv (no bias) -> IN -> ReLU                                  cin -> c
    2 x [4x4 stride-2 conv (no bias) -> IN -> ReLU]                   c -> 2c -> 4c
    num_res_blocks x residual block [3x3 conv -> IN -> ReLU -> 3x3 conv -> IN] + identity (convs without bias)
    2 x [4x4 stride-2 transposed conv (no bias) -> IN -> ReLU]        4c -> 2c -> c
    7x7 conv (no bias)                                                c -> 1

Every IN is ``InstanceNorm2d(affine=True, track_running_stats=True)``. The modules sit in one ``nn.Sequential``
named ``main`` in the published order, so the state-dict keys are the published ones (``main.0.weight``,
``main.1.running_mean``, ..., ``main.9.main.0.weight``, ...); with ``in_channels=3`` a published checkpoint loads
unchanged. Brainomaly turns the one-channel network output into the image as in the paper's Eq. 2 without a gate:
``x' = tanh(x + G(x))`` (``solver.py``), which :meth:`BrainomalyGenerator.forward` returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InstanceNormPerImage", "BrainomalyResidualBlock", "BrainomalyGenerator"]


class InstanceNormPerImage(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d(num_features, affine=True, track_running_stats=True)`` (Brainomaly's norm layer,
    same parameters and buffers) that normalises with each image's own statistics in eval mode too.

    Brainomaly's solver never switches its generator to eval mode, so every published result (and the
    paper's Tables 2-3) used per-image statistics; a plain ``InstanceNorm2d`` with tracked statistics would
    switch to the running averages under ``model.eval()``. Train mode updates the running statistics exactly as
    ``nn.InstanceNorm2d`` does (they are kept so that checkpoints keep Brainomaly's keys); eval mode leaves them
    untouched. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, affine=True, track_running_stats=True)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.training:
            return F.instance_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps
            )
        return F.instance_norm(input, None, None, self.weight, self.bias, True, momentum, self.eps)


class BrainomalyResidualBlock(nn.Module):
    """Brainomaly's residual block: x + IN(conv3x3(ReLU(IN(conv3x3(x))))), convs without bias.

    (B, C, H, W) -> (B, C, H, W); the layers sit in ``main`` as published (indices 0, 1, 3, 4 hold weights).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False),
            InstanceNormPerImage(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False),
            InstanceNormPerImage(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class BrainomalyGenerator(nn.Module):
    """Brainomaly generator (Siddiquee et al., WACV 2024; the paper's ref. [22]) as published, for grey images.

    Args:
        in_channels: image channels. Published: 3 (``3 + c_dim`` with ``c_dim = 0``; Brainomaly's loader converts
            every image to RGB); 1 for this bundle's grey images, which changes only the first conv's weight.
        conv_dim: width of the first conv (published ``g_conv_dim``, default 64); the widths are
            conv_dim * (1, 2, 4).
        num_res_blocks: residual blocks in the bottleneck (published ``g_repeat_num``, default 6).

    Defaults (1, 64, 6): 8,402,304 parameters (8,408,576 with ``in_channels=3``).

    ``forward`` takes (B, C, H, W) in [-1, 1], H and W divisible by 4, and returns ``tanh(x + m)``, the restored
    image, same shape, in (-1, 1); ``m = additive_map(x)`` is the network's one-channel output (B, 1, H, W),
    broadcast over the C image channels as in Brainomaly. There is no delta gate (paper, Eq. 1, is SAGAN's), so
    train and eval mode compute the same function (see :class:`InstanceNormPerImage`).

    ``hparams`` holds the constructor arguments (a JSON-able dict). The module scripts with ``torch.jit.script``.
    """

    # a dict of mixed value types has no TorchScript type; it is bookkeeping, not used by forward
    __jit_ignored_attributes__ = ["hparams"]

    def __init__(self, in_channels: int = 1, conv_dim: int = 64, num_res_blocks: int = 6) -> None:
        super().__init__()
        self.hparams = {"in_channels": in_channels, "conv_dim": conv_dim, "num_res_blocks": num_res_blocks}
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, conv_dim, kernel_size=7, stride=1, padding=3, bias=False),
            InstanceNormPerImage(conv_dim),
            nn.ReLU(inplace=True),
        ]
        c = conv_dim
        for _ in range(2):  # down-sampling
            layers += [
                nn.Conv2d(c, c * 2, kernel_size=4, stride=2, padding=1, bias=False),
                InstanceNormPerImage(c * 2),
                nn.ReLU(inplace=True),
            ]
            c *= 2
        layers += [BrainomalyResidualBlock(c) for _ in range(num_res_blocks)]  # bottleneck
        for _ in range(2):  # up-sampling
            layers += [
                nn.ConvTranspose2d(c, c // 2, kernel_size=4, stride=2, padding=1, bias=False),
                InstanceNormPerImage(c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        layers.append(nn.Conv2d(c, 1, kernel_size=7, stride=1, padding=3, bias=False))
        self.main = nn.Sequential(*layers)

    def additive_map(self, x: torch.Tensor) -> torch.Tensor:
        """Brainomaly's network output (its "mask"): (B, C, H, W) -> (B, 1, H, W), unbounded."""
        return self.main(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if h % 4 or w % 4:
            raise ValueError(f"image size {h}x{w} must be divisible by 4 (two stride-2 convs).")
        return torch.tanh(x + self.additive_map(x))
