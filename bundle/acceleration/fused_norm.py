# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The generator's instance norms and the ReLUs after them as Triton kernels on CUDA (``fused_instance_norm``, the
``gpu`` preset); elsewhere the layers compute what they computed before."""

from __future__ import annotations

import warnings
from functools import cache

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN
from torch import nn

from .layout import LayoutAwareInstanceNorm2d, is_channels_last

__all__ = ["FusedInstanceNormAct2d", "fuse_instance_norm_relu"]


@cache
def _triton_instance_norm():
    """The Triton kernels' entry point, or None (with one warning) where Triton cannot be imported."""
    try:
        from .triton_instance_norm import instance_norm_act
    except ImportError as e:
        warnings.warn(f"fused_instance_norm: Triton is not available ({e}); instance norms run unfused.", stacklevel=3)
        return None
    return instance_norm_act


class FusedInstanceNormAct2d(LayoutAwareInstanceNorm2d):
    """:class:`LayoutAwareInstanceNorm2d` followed by a ReLU if ``relu`` (the ReLU of the enclosing ADN block,
    which becomes an ``nn.Identity``). On a channels-last CUDA tensor both run as Triton kernels
    (``triton_instance_norm``): the output keeps the input's dtype (bf16 under autocast) and layout, with no
    float32 or NCHW copies in between. Elsewhere (CPU, NCHW, no Triton) it computes what the two layers computed
    before. Same parameters and state dict as ``nn.InstanceNorm2d``; (B, C, H, W) -> (B, C, H, W)."""

    relu: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and is_channels_last(x) and not self.track_running_stats:
            kernel = _triton_instance_norm()
            if kernel is not None:
                return kernel(x, self.weight, self.bias, self.eps, self.relu)
        y = super().forward(x)
        return F.relu_(y) if self.relu else y  # a fresh tensor: in place, as the ADN's in-place ReLU did


def fuse_instance_norm_relu(module: nn.Module) -> nn.Module:
    """Turn every instance norm without running statistics under ``module`` into a
    :class:`FusedInstanceNormAct2d`, taking over the ReLU where an ADN block runs norm then ReLU. Parameters,
    state-dict keys and CPU results are unchanged; returns ``module``."""
    modules = list(module.modules())
    for m in modules:
        if isinstance(m, nn.InstanceNorm2d) and not m.track_running_stats:
            m.__class__ = FusedInstanceNormAct2d
    for m in modules:
        if isinstance(m, ADN) and list(m._modules) == ["N", "A"] and type(m.A) is nn.ReLU:
            if isinstance(m.N, FusedInstanceNormAct2d):
                m.N.relu = True
                m.A = nn.Identity()
    return module
