# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""conv -> norm -> activation layers of the SAGAN generator (paper, Fig. 2 and Secs. 2.2-2.3) and critic
(paper, Sec. 3.1, "Implementation details"), as MONAI ``Convolution`` blocks, and the tests that the faster layers
share (memory layout, which convolutions they replace)."""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["IN_AFFINE", "IN_PLAIN", "conv_block", "up_block", "is_channels_last", "is_plain_conv2d"]

IN_AFFINE = ("instance", {"affine": True})
IN_PLAIN = ("instance", {"affine": False})


def conv_block(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False, norm=IN_AFFINE, act="relu"):
    """conv -> norm -> activation (``norm``/``act`` may be ``None``); "same" padding at stride 1, halving at 2.

    Maps (B, cin, H, W) to (B, cout, H / stride, W / stride).
    """
    return Convolution(
        spatial_dims=2,
        in_channels=cin,
        out_channels=cout,
        strides=stride,
        kernel_size=kernel,
        padding=(kernel - stride + 1) // 2 if stride > 1 else kernel // 2,
        adn_ordering="NA",
        act=act,
        norm=norm,
        bias=bias,
    )


def up_block(cin: int, cout: int) -> Convolution:
    """4x4 stride-2 transposed conv (no bias) -> IN(affine) -> ReLU: (B, cin, H, W) -> (B, cout, 2H, 2W)."""
    return Convolution(
        spatial_dims=2,
        in_channels=cin,
        out_channels=cout,
        strides=2,
        kernel_size=4,
        padding=1,
        output_padding=0,
        is_transposed=True,
        adn_ordering="NA",
        act="relu",
        norm=IN_AFFINE,
        bias=False,
    )


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last and not also NCHW-contiguous (one channel, or 1x1 maps, fit
    both layouts: those count as NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def is_plain_conv2d(m: nn.Module, kernel_size: int, padding: int) -> bool:
    """Whether ``m`` is an ``nn.Conv2d`` itself (no subclass) with a ``kernel_size`` x ``kernel_size`` kernel,
    stride 1, ``padding`` on every side (zeros), no dilation and one group."""
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (kernel_size, kernel_size)
        and m.stride == (1, 1)
        and m.padding == (padding, padding)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )
