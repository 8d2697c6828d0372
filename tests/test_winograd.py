# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""``WinogradConv2d``: 3x3 convolutions on 4x4 maps by Winograd's F(4x4, 3x3) equal the convolution (float64),
within float32 rounding of it, and every other input takes the convolution itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bundle.acceleration.winograd import WinogradConv2d, use_winograd_convolutions
from bundle.networks import SAGANGenerator


def conv_pair(cin: int, cout: int, bias: bool, dtype: torch.dtype, channels_last: bool):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(dtype)
    fast = use_winograd_convolutions(nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias).to(dtype)))[0]
    fast.load_state_dict(plain.state_dict())
    if channels_last:
        plain.to(memory_format=torch.channels_last)
        fast.to(memory_format=torch.channels_last)
    return plain, fast


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_matches_the_convolution_in_float64(channels_last, bias):
    plain, fast = conv_pair(24, 40, bias, torch.float64, channels_last)
    assert type(fast) is WinogradConv2d
    x = torch.randn(5, 24, 4, 4, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), fast(x2)
    assert y2.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-10)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=0, atol=1e-10)
    assert fast.weight.grad.stride() == plain.weight.grad.stride()
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=0, atol=1e-10)


def test_float32_error_is_float_rounding():
    """The paper preset's bottleneck width. Measured: about twice the direct convolution's own float32 error."""
    plain, fast = conv_pair(512, 512, True, torch.float32, True)
    x = torch.randn(16, 512, 4, 4).to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = nn.functional.conv2d(x.double(), plain.weight.double(), plain.bias.double(), padding=1)
        error = (fast(x).double() - exact).abs().max().item()
        direct = (plain(x).double() - exact).abs().max().item()
    assert error < 1e-5 * exact.abs().max().item() and error < 10 * direct


def test_other_inputs_take_the_convolution():
    """Maps other than 4x4, and bf16 autocast (whose rounding the transforms would magnify), run the convolution:
    bit-identical results."""
    plain, fast = conv_pair(8, 8, True, torch.float32, False)
    with torch.no_grad():
        x = torch.randn(3, 8, 8, 8)
        assert torch.equal(fast(x), plain(x))
        x = torch.randn(3, 8, 4, 4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fast(x), plain(x))


def test_swaps_only_plain_3x3_stride_1_convolutions():
    """In the generator: every 3x3, stride-1, padding-1 convolution and nothing else; the state dict is unchanged."""
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=4, num_res_blocks=2)
    keys = list(g.state_dict())
    eligible = [
        m
        for m in g.modules()
        if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
    ]
    assert len(eligible) < sum(type(m) is nn.Conv2d for m in g.modules())  # strided and 1x1 convs stay
    use_winograd_convolutions(g)
    swapped = [m for m in g.modules() if isinstance(m, WinogradConv2d)]
    assert swapped and [id(m) for m in swapped] == [id(m) for m in eligible]
    assert list(g.state_dict()) == keys
