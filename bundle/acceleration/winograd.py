# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""3x3 convolutions on 4x4 maps by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016), for the CPU.

The generator's bottleneck (its residual blocks and the decoder's first convolution) runs 3x3, stride-1, padding-1
convolutions on 4x4 maps with 512 or 1024 channels at the paper preset: about a quarter of a training iteration on
the CPU. With padding, a 4x4 map is exactly one 6x6 Winograd tile, so the convolution becomes 36 matrix products
of (images, C_in) x (C_in, C_out) between small fixed transforms: 36 multiplications per output channel, input
channel and image instead of the direct convolution's 100 (144 with the taps that meet padding). The result is the
convolution's up to float rounding; in float32 the rounding error is about twice the direct convolution's
(transform coefficients up to 8 and 1/24). oneDNN offers no Winograd algorithm through PyTorch, and cuDNN chooses
its own algorithms, so the layer keeps the ordinary convolution on GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import is_channels_last, is_plain_conv2d

__all__ = ["WinogradConv2d", "use_winograd_convolutions"]

# F(4x4, 3x3): Y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d and a 3x3 filter g (cross-correlation)
_B_T = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_A_T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


# the 2-D transforms as Kronecker products acting on row-major flattened tiles: input (36, 16) (the 4x4 map; the
# tile's padding ring is zero, so only B^T's middle four columns act), filter (36, 9), output (16, 36)
_KRONECKER = tuple(
    torch.kron(m, m)
    for m in (
        torch.tensor(_B_T, dtype=torch.float64)[:, 1:5],
        torch.tensor(_G, dtype=torch.float64),
        torch.tensor(_A_T, dtype=torch.float64),
    )
)


def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(m.to(dtype=dtype, device=device) for m in _KRONECKER)


def _input_tiles(x: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """(B, C_in, 4, 4) -> the transformed tiles (B, 36, C_in)."""
    return torch.matmul(kb, x.permute(0, 2, 3, 1).reshape(x.shape[0], 16, x.shape[1]))  # a view if channels-last


def _filter_tiles(weight: torch.Tensor, kg: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> the transformed filters (36, C_in, C_out)."""
    k, c = weight.shape[0], weight.shape[1]
    return (kg @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(36, c, k)


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class _Winograd4x4(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) for x (B, C_in, 4, 4) and weight (C_out, C_in, 3, 3). Saves only x and
    the weight (as the convolution does) and recomputes the transformed tiles in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kb, kg, ka = _transforms(x.dtype, x.device)
        n, k = x.shape[0], weight.shape[0]
        m = torch.bmm(_input_tiles(x, kb).transpose(0, 1), _filter_tiles(weight, kg))  # (36, B, C_out)
        y = (ka @ m.view(36, n * k)).view(4, 4, n, k).permute(2, 3, 0, 1).contiguous(memory_format=_layout(x))
        if bias is not None:
            y += bias.view(1, k, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        n, c, k = x.shape[0], x.shape[1], weight.shape[0]
        kb, kg, ka = _transforms(x.dtype, x.device)
        grad_m = (ka.t() @ grad.permute(2, 3, 0, 1).reshape(16, n * k)).view(36, n, k)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.bmm(grad_m, _filter_tiles(weight, kg).transpose(1, 2))  # (36, B, C_in)
            grad_x = (kb.t() @ grad_v.view(36, n * c)).view(4, 4, n, c).permute(2, 3, 0, 1)
            grad_x = grad_x.contiguous(memory_format=_layout(x))
        if ctx.needs_input_grad[1]:
            grad_u = torch.bmm(_input_tiles(x, kb).permute(1, 2, 0), grad_m)  # (36, C_in, C_out)
            grad_w = (kg.t() @ grad_u.view(36, c * k)).view(3, 3, c, k).permute(3, 2, 0, 1)
            grad_w = grad_w.contiguous(memory_format=_layout(weight))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` that computes 4x4 float32 / float64 CPU inputs by Winograd's
    F(4x4, 3x3) (module docstring) outside autocast; other inputs take the ordinary convolution. Under
    ``torch.compile`` the same matrix products are traced into the compiled graph.
    Same parameters and state dict as ``nn.Conv2d``; (B, C_in, H, W) -> (B, C_out, H, W), in the input's layout.
    Differentiable once (the generator is never inside a double backward: the gradient penalty's goes through the
    critic only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 4
            and x.shape[-2:] == (4, 4)
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu")
        ):
            return _Winograd4x4.apply(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


def use_winograd_convolutions(module: nn.Module) -> nn.Module:
    """Turn every plain 3x3, stride-1, padding-1 ``nn.Conv2d`` under ``module`` into a :class:`WinogradConv2d`
    (only the class changes: parameters, state-dict keys and GPU results stay as they were); returns ``module``."""
    for m in module.modules():
        if is_plain_conv2d(m, kernel_size=3, padding=1):
            m.__class__ = WinogradConv2d
    return module
