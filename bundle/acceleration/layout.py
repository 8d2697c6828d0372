# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Channels-last versions of the generator's layers: the same parameters, state dict and values (up to float rounding),
computed without the copies back to NCHW that PyTorch's own layers make on a channels-last input.

:func:`use_layout_aware_layers` swaps them in (``bundle.acceleration.place_network(..., channels_last=True)``, the
``fast`` and ``gpu`` presets); on NCHW inputs each takes PyTorch's own code path, bit for bit. Measurements:
docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from torch import nn

from ..networks.generator import PositionBlock, SAGANGenerator

__all__ = [
    "is_channels_last",
    "is_plain_conv2d",
    "LayoutAwareInstanceNorm2d",
    "LayoutAwarePointwiseConv2d",
    "LayoutAwarePositionBlock",
    "ChannelsLastStem",
    "use_layout_aware_layers",
]


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


# PyTorch's CPU group_norm on a channels-last map of fewer pixels than this parallelises over (sample, group) and
# reads each group's channels with a stride of C (its ``feature_map_threshold``): with one channel per group that is
# one float per cache line, several times slower than normalising an NCHW copy (docs/performance.md)
_CPU_CHANNELS_LAST_NORM_MIN_PIXELS = 1024


class _InstanceNormOnNCHWCopy(torch.autograd.Function):
    """Instance norm (one-channel groups, optional affine) of a channels-last (B, C, H, W) tensor computed on an
    NCHW copy in ``dtype``; the output and the input gradient come back channels-last in the input's dtype (through
    autograd's copy the gradient would stay NCHW and slow the convolution before). Saves the NCHW copy and the
    (B, C) statistics, as ``group_norm`` saves its input."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, dtype: torch.dtype):  # noqa: D102
        n, c, h, w = x.shape
        x_nchw = x.to(dtype, memory_format=torch.contiguous_format)
        y, mean, rstd = torch.native_group_norm(x_nchw, weight, bias, n, c, h * w, c, eps)
        ctx.save_for_backward(x_nchw, weight, mean, rstd)
        ctx.input_dtype = x.dtype
        return y.to(x.dtype, memory_format=torch.channels_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        x_nchw, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x_nchw.shape
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_nchw = grad.to(x_nchw.dtype, memory_format=torch.contiguous_format)
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad_nchw, x_nchw, mean, rstd, weight, n, c, h * w, c, mask
        )
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype, memory_format=torch.channels_last)
        return grad_x, grad_w, grad_b, None, None


class LayoutAwareInstanceNorm2d(nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` (instance statistics, no running statistics) that keeps a channels-last input
    channels-last: there it computes the same normalisation as ``F.group_norm`` with one channel per group
    (``instance_norm`` would copy the input to NCHW and return NCHW), on the CPU for maps under 1024 pixels on an
    NCHW copy (PyTorch's channels-last kernel is slow there). NCHW inputs take ``instance_norm`` itself.
    A bfloat16 / float16 channels-last input (autocast) is normalised in float32 and returned in its own dtype.
    Same parameters and state dict as ``nn.InstanceNorm2d``; (B, C, H, W) -> (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x) and not self.track_running_stats:
            # CPU autocast leaves group_norm in bfloat16, where it is several times slower than in float32
            # (CUDA autocast runs it in float32 anyway)
            dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
            if not torch.jit.is_scripting():  # (a scripted module keeps PyTorch's channels-last kernel)
                if x.device.type == "cpu" and x.shape[-2] * x.shape[-1] < _CPU_CHANNELS_LAST_NORM_MIN_PIXELS:
                    return self._normalise_nchw_copy(x, dtype)
            y = F.group_norm(x.to(dtype), x.shape[1], self.weight, self.bias, self.eps)
            return y.to(x.dtype)
        return F.instance_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )

    @torch.jit.unused
    def _normalise_nchw_copy(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _InstanceNormOnNCHWCopy.apply(x, self.weight, self.bias, self.eps, dtype)


class LayoutAwarePointwiseConv2d(nn.Conv2d):
    """A 1x1, stride-1 ``nn.Conv2d`` that runs on a channels-last input as one matrix product over the channels
    (``F.linear`` on the (B, H, W, C) view, no copy); NCHW inputs take the ordinary convolution. Same parameters
    and state dict as ``nn.Conv2d``; (B, Cin, H, W) -> (B, Cout, H, W), channels-last in, channels-last out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_channels_last(x):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return self._conv_forward(x, self.weight, self.bias)


class LayoutAwarePositionBlock(PositionBlock):
    """:class:`~bundle.networks.PositionBlock` that, on a channels-last input, does not materialise the
    concatenation of the position code: the code is constant over the patch, so its part of the 1x1 conv is one
    vector per patch, added to the conv of the features (the same sum, reordered). NCHW inputs and
    ``after_norm=True`` take the block's own code. Same parameters and state dict."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.after_norm or not is_channels_last(x):
            return super().forward(x, positions)
        c = x.shape[1]
        weight = self.fuse.conv.weight.flatten(1)  # (C, C + bits)
        code = self.encoding.codes_for(x.shape[0], positions).to(x.dtype)
        per_patch = F.linear(code, weight[:, c:], self.fuse.conv.bias)  # (P, C)
        y = F.linear(x.permute(0, 2, 3, 1), weight[:, :c]) + per_patch[:, None, None, :]
        return self.fuse.adn(y.permute(0, 3, 1, 2))


class ChannelsLastStem(Convolution):
    """The generator's first conv -> norm -> ReLU block, returning a channels-last map: with one input channel a
    convolution cannot tell the layout it should produce, and the layers after the stem run channels-last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x)
        return x.contiguous(memory_format=torch.channels_last)


def use_layout_aware_layers(module: nn.Module) -> nn.Module:
    """Give every InstanceNorm2d (without running statistics) and every plain 1x1 Conv2d under ``module`` the
    layout-aware ``forward`` above, and make every ReLU that follows a norm in-place (the norm's output feeds only
    the ReLU, and a norm's backward needs its input, not its output: one activation less kept per layer). Only the
    class or the ``inplace`` flag changes: parameters, state-dict keys and the random draws of the initialisation
    are untouched, and NCHW inputs get the values they got before, bit for bit. A
    :class:`~bundle.networks.SAGANGenerator` also gets :class:`LayoutAwarePositionBlock` and
    :class:`ChannelsLastStem`. Returns ``module``."""
    for m in module.modules():
        if type(m) is nn.InstanceNorm2d and not m.track_running_stats:
            m.__class__ = LayoutAwareInstanceNorm2d
        elif is_plain_conv2d(m, kernel_size=1, padding=0):
            m.__class__ = LayoutAwarePointwiseConv2d
        elif isinstance(m, ADN) and list(m._modules) == ["N", "A"] and type(m.A) is nn.ReLU:
            m.A.inplace = True
        elif type(m) is PositionBlock:
            m.__class__ = LayoutAwarePositionBlock
    if isinstance(module, SAGANGenerator) and type(module.stem) is Convolution:
        module.stem.__class__ = ChannelsLastStem
    return module
