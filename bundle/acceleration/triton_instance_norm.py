# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Instance norm (+ optional affine, + optional ReLU) as Triton kernels on channels-last CUDA tensors.

PyTorch's ``group_norm`` on CUDA copies a channels-last input to NCHW and returns NCHW; CUDA autocast also runs
it in float32, so a bf16 convolution output is copied to float32, then to NCHW, normalised, ReLU'd, and turned
back into bf16 and channels-last by the next convolution (a third of the generator's GPU kernel time,
docs/performance.md). These kernels read the input once for the mean, once for the variance (two passes, as
exact as Welford) and once to write ``relu((x - mean) * rstd * weight + bias)`` in the input's own dtype and
layout; statistics are float32. Backward reads input and output gradient twice and recomputes the normalised
values instead of keeping them: only the input and two (B, C) float32 statistics are saved.

Imported only when used (Triton is needed on CUDA only). With ``TRITON_INTERPRET=1`` set before this module is
imported, the kernels also run on CPU tensors (Triton's interpreter), which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["instance_norm_act"]


@triton.jit
def _tile(base, start, cols, col_ok, C, L: tl.constexpr, BLOCK_L: tl.constexpr):  # noqa: N803 (Triton constexpr)
    """Offsets and mask of one (BLOCK_L, BLOCK_C) tile: rows [start, start + BLOCK_L) of the sample at ``base``,
    the program's channels ``cols`` (channels-last: a row holds the C channels of one pixel)."""
    rows = start + tl.arange(0, BLOCK_L)
    return base + rows[:, None] * C + cols[None, :], (rows < L)[:, None] & col_ok[None, :]


@triton.jit
def _xhat_and_grad(x_ptr, dy_ptr, offs, ok, mean, rstd, w, b, RELU: tl.constexpr):  # noqa: N803 (Triton constexpr)
    """One tile of the normalised input and of the output gradient, float32; with ``RELU`` the gradient is zero
    where the affine output was not positive (the ReLU's backward)."""
    xhat = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
    dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if RELU:
        dy = tl.where(xhat * w[None, :] + b[None, :] > 0.0, dy, 0.0)
    return xhat, dy


@triton.jit
def _forward_kernel(  # Triton constexpr arguments in capitals
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, eps, L: tl.constexpr,  # noqa: N803
    AFFINE: tl.constexpr, RELU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,  # noqa: N803
):  # fmt: skip
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    base = n.to(tl.int64) * L * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, ok = _tile(base, start, cols, col_ok, C, L, BLOCK_L)
        acc += tl.sum(tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32), axis=0)
    mean = acc / L
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, ok = _tile(base, start, cols, col_ok, C, L, BLOCK_L)
        d = tl.where(ok, tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :], 0.0)
        acc += tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(acc / L + eps)
    tl.store(mean_ptr + n * C + cols, mean, mask=col_ok)
    tl.store(rstd_ptr + n * C + cols, rstd, mask=col_ok)
    scale = rstd
    shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    if AFFINE:
        scale = rstd * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        shift = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, ok = _tile(base, start, cols, col_ok, C, L, BLOCK_L)
        y = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * scale[None, :]
        y += shift[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _backward_kernel(  # Triton constexpr arguments in capitals
    x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    C, L: tl.constexpr,  # noqa: N803
    AFFINE: tl.constexpr, RELU: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,  # noqa: N803
):  # fmt: skip
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    base = n.to(tl.int64) * L * C
    mean = tl.load(mean_ptr + n * C + cols, mask=col_ok, other=0.0)
    rstd = tl.load(rstd_ptr + n * C + cols, mask=col_ok, other=0.0)
    w = tl.full([BLOCK_C], 1.0, dtype=tl.float32)
    b = tl.zeros([BLOCK_C], dtype=tl.float32)
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # dy here is the gradient of the affine output (behind the ReLU); s1 = sum(dy), s2 = sum(dy * xhat)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, L, BLOCK_L):
        offs, ok = _tile(base, start, cols, col_ok, C, L, BLOCK_L)
        xhat, dy = _xhat_and_grad(x_ptr, dy_ptr, offs, ok, mean, rstd, w, b, RELU)
        s1 += tl.sum(dy, axis=0)
        s2 += tl.sum(dy * xhat, axis=0)
    tl.store(sum_dy_ptr + n * C + cols, s1, mask=col_ok)
    tl.store(sum_dy_xhat_ptr + n * C + cols, s2, mask=col_ok)
    m1 = s1 / L
    m2 = s2 / L
    for start in range(0, L, BLOCK_L):
        offs, ok = _tile(base, start, cols, col_ok, C, L, BLOCK_L)
        xhat, dy = _xhat_and_grad(x_ptr, dy_ptr, offs, ok, mean, rstd, w, b, RELU)
        dx = (dy - m1[None, :] - xhat * m2[None, :]) * (rstd * w)[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _blocks(n: int, c: int, spatial: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_C): up to 64 channels per program (128-byte rows in bf16), fewer while that leaves under
    512 programs (one per sample and channel block: small batches of wide maps need more of them to fill a GPU);
    tiles of about 4096 elements."""
    block_c = min(64, triton.next_power_of_2(c))
    while block_c > 16 and n * triton.cdiv(c, block_c) < 512:
        block_c //= 2
    block_l = max(1, min(triton.next_power_of_2(spatial), 4096 // block_c))
    return block_l, block_c


class _InstanceNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, relu):  # noqa: D102 (see instance_norm_act)
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean = torch.empty(n, c, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_l, block_c = _blocks(n, c, h * w)
        affine = weight is not None
        _forward_kernel[(n, triton.cdiv(c, block_c))](
            x, y, weight if affine else x, bias if affine else x, mean, rstd, c, eps, h * w,
            AFFINE=affine, RELU=relu, BLOCK_L=block_l, BLOCK_C=block_c,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.relu = relu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sum_dy = torch.empty(n, c, device=x.device, dtype=torch.float32)
        sum_dy_xhat = torch.empty_like(sum_dy)
        block_l, block_c = _blocks(n, c, h * w)
        affine = weight is not None
        _backward_kernel[(n, triton.cdiv(c, block_c))](
            x, dy, dx, weight if affine else x, bias if affine else x, mean, rstd, sum_dy, sum_dy_xhat, c, h * w,
            AFFINE=affine, RELU=ctx.relu, BLOCK_L=block_l, BLOCK_C=block_c,
        )  # fmt: skip
        if not affine:
            return dx, None, None, None, None
        dweight = sum_dy_xhat.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def instance_norm_act(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, relu: bool
) -> torch.Tensor:
    """``relu(instance_norm(x) * weight + bias)`` (ReLU only if ``relu``; ``weight``/``bias`` both or neither)
    for a channels-last (B, C, H, W) tensor of any float dtype, returned in ``x``'s dtype and layout; statistics
    (biased variance, as ``nn.InstanceNorm2d``) and arithmetic in float32. Once differentiable."""
    if (weight is None) != (bias is None):
        raise ValueError("instance_norm_act takes both weight and bias, or neither.")
    x = x.contiguous(memory_format=torch.channels_last)
    return _InstanceNormAct.apply(x, weight, bias, float(eps), bool(relu))
