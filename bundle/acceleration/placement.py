# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Put a network on its device with the speed switches a preset asks for (``configs/presets/fast.json``,
``gpu.json``); with every switch off the network is the method's, unchanged."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import require_bool
from ..networks.generator import SAGANGenerator
from .fused_norm import fuse_instance_norm_relu
from .layout import use_layout_aware_layers
from .one_pixel_conv import use_one_pixel_convolutions
from .winograd import use_winograd_convolutions

__all__ = ["place_network", "place_critic"]


def place_network(
    network: nn.Module,
    device: torch.device | str,
    channels_last: bool = False,
    fused_instance_norm: bool = False,
    winograd_convolutions: bool = False,
) -> nn.Module:
    """``network`` (a generator) on ``device``:

    - ``channels_last``: in channels-last memory layout, a :class:`~bundle.networks.SAGANGenerator` with the
      layout-aware layers of :mod:`bundle.acceleration.layout`;
    - ``fused_instance_norm``: its instance norms (and the ReLUs after them) as Triton kernels on CUDA
      (:func:`~bundle.acceleration.fuse_instance_norm_relu`);
    - ``winograd_convolutions``: its 3x3 convolutions on 4x4 maps by Winograd's algorithm on the CPU
      (:func:`~bundle.acceleration.use_winograd_convolutions`).

    Parameters and state dict stay those of the network. Call it before a DistributedDataParallel wrapper is built,
    whose gradient buckets keep the parameters' layout at construction."""
    require_bool(
        channels_last=channels_last,
        fused_instance_norm=fused_instance_norm,
        winograd_convolutions=winograd_convolutions,
    )
    if channels_last and isinstance(network, SAGANGenerator):
        use_layout_aware_layers(network)
    if fused_instance_norm:
        fuse_instance_norm_relu(network)
    if winograd_convolutions:
        use_winograd_convolutions(network)
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network


def place_critic(
    network: nn.Module, device: torch.device | str, channels_last: bool = False, one_pixel_convolutions: bool = True
) -> nn.Module:
    """``network`` (a critic) on ``device``, in channels-last memory layout if asked, and with convolutions whose
    output is one pixel computed as one matrix product (:class:`~bundle.acceleration.OnePixelConv2d`: the same
    result up to float rounding; on by default, as every run of this bundle has trained its critic so)."""
    require_bool(channels_last=channels_last, one_pixel_convolutions=one_pixel_convolutions)
    if one_pixel_convolutions:
        use_one_pixel_convolutions(network)
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network
