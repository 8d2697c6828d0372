# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Convolutions whose one-pixel output is computed as a matrix product over the kernel taps that meet the input
(the critic's last layers at 64x64); ``bundle.acceleration.place_network`` applies them to a critic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OnePixelConv2d", "use_one_pixel_convolutions"]


class OnePixelConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes a one-pixel output, whose window covers the whole input, as one matrix product
    over the kernel taps that meet the input. The other taps meet zero padding and add nothing, so the result is the
    convolution's up to float rounding. At 64x64 these are the critic's last two layers: 3/4 of the 4x4 conv's
    2048 x 1024 x 4 x 4 weights and 8/9 of the final 3x3 conv's meet padding there, yet a convolution reads them all
    at every pass (critic step 0.59x the time, docs/performance.md). Other inputs take the ordinary convolution.

    Same parameters and state dict as ``nn.Conv2d``; (B, Cin, H, W) -> (B, Cout, H', W').
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.padding, str) or x.dim() != 4:  # "same"/"valid" padding, unbatched input
            return self._conv_forward(x, self.weight, self.bias)
        h, w = x.shape[-2], x.shape[-1]
        kh, kw = self.kernel_size[0], self.kernel_size[1]
        sh, sw = self.stride[0], self.stride[1]
        ph, pw = self.padding[0], self.padding[1]
        one_pixel = (h + 2 * ph - kh) // sh == 0 and (w + 2 * pw - kw) // sw == 0 and ph + h <= kh and pw + w <= kw
        plain = self.groups == 1 and self.dilation[0] == 1 and self.dilation[1] == 1 and self.padding_mode == "zeros"
        if one_pixel and plain:
            taps = self.weight[:, :, ph : ph + h, pw : pw + w]
            return F.linear(x.flatten(1), taps.flatten(1), self.bias)[:, :, None, None]
        return self._conv_forward(x, self.weight, self.bias)


def use_one_pixel_convolutions(module: nn.Module) -> nn.Module:
    """Every ``nn.Conv2d`` (itself, no subclass) under ``module`` computes with :class:`OnePixelConv2d`'s forward
    (the class changes; parameters, state dict and the random stream are untouched). Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = OnePixelConv2d
    return module
