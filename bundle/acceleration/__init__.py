# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Speed machinery, kept apart from the method: faster layers with the same parameters and results (up to float
rounding), applied by :func:`place_network` / :func:`place_critic` when a preset's switch asks. Nothing in
:mod:`bundle.networks` imports this package. Measurements: docs/performance.md."""

from .fused_norm import FusedInstanceNormAct2d, fuse_instance_norm_relu
from .layout import (
    ChannelsLastStem,
    LayoutAwareInstanceNorm2d,
    LayoutAwarePointwiseConv2d,
    LayoutAwarePositionBlock,
    is_channels_last,
    use_layout_aware_layers,
)
from .one_pixel_conv import OnePixelConv2d, use_one_pixel_convolutions
from .placement import place_critic, place_network
from .winograd import WinogradConv2d, use_winograd_convolutions
