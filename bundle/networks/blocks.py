# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""conv -> norm -> activation layers of the SAGAN generator (paper, Fig. 2 and Secs. 2.2-2.3) and critic
(paper, Sec. 3.1, "Implementation details"), as MONAI ``Convolution`` blocks."""

from __future__ import annotations

from monai.networks.blocks import Convolution

__all__ = ["IN_AFFINE", "IN_PLAIN", "conv_block", "up_block"]

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
