# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Networks: parameter counts, shapes, patching, position codes, gating, hparams, the critic's deprecated name
and the Brainomaly baseline against its published layer list."""

import hashlib
import json

import pytest
import torch
from torch import nn

from bundle.acceleration import LayoutAwareInstanceNorm2d
from bundle.networks import (
    BrainomalyGenerator,
    InstanceNormPerImage,
    PatchDiscriminator,
    PositionalConditionEncoding,
    PositionBlock,
    SAGANCritic,
    SAGANGenerator,
    split_patches,
    stitch_patches,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_preset_parameter_counts():
    g, d = SAGANGenerator(), SAGANCritic()
    assert n_params(g) == 44_758_979
    assert n_params(d) == 44_719_040
    assert state_dict_digest(g) == "8c057e93f749eea2"  # see STATE_DICT_DIGESTS
    assert state_dict_digest(d) == "5f8b21935a1b50d0"


def test_shapes_and_range():
    g, d = SAGANGenerator(conv_dim=8, num_res_blocks=1), SAGANCritic(conv_dim=4)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() < 1
    assert d(x).shape == (3, 1, 1, 1)
    assert SAGANCritic(conv_dim=4, num_layers=4)(x).shape == (3, 1, 4, 4)
    assert g(torch.zeros(1, 1, 48, 80)).shape == (1, 1, 48, 80)  # any H, W divisible by 8*N
    with pytest.raises(ValueError, match="divisible by 8"):
        g(torch.zeros(1, 1, 60, 64))


def test_patch_split_order_and_exact_stitch():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    p = split_patches(x, 2)
    assert p.shape == (8, 1, 2, 2)
    assert torch.equal(p[0], x[0, :, :2, :2]) and torch.equal(p[1], x[0, :, :2, 2:])  # top-left, top-right
    assert torch.equal(p[2], x[0, :, 2:, :2]) and torch.equal(p[3], x[0, :, 2:, 2:])  # bottom-left, bottom-right
    assert torch.equal(p[4], x[1, :, :2, :2])  # image-major
    assert torch.equal(stitch_patches(p, 2), x)
    assert torch.equal(stitch_patches(split_patches(x, 1), 1), x)


def test_position_codes():
    enc = PositionalConditionEncoding(2)
    assert enc.num_bits == 3
    assert enc.codes.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    out = enc(torch.zeros(8, 5, 3, 3))  # two images x four patches
    assert out.shape == (8, 8, 3, 3)
    assert out[5, 5:, 0, 0].tolist() == [0, 0, 1] and out[7, 5:, 2, 1].tolist() == [0, 1, 1]
    assert PositionalConditionEncoding(1).num_bits == 1
    assert PositionalConditionEncoding(4).num_bits == 5


def test_gating_random_in_train_deterministic_in_eval():
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=8, num_res_blocks=1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    g.train()
    a, b = g(x), g(x)
    assert not torch.equal(a, b)
    # where delta = 0 the output is tanh(2x): about 5% of the pixels
    frac = torch.isclose(a, torch.tanh(2 * x), atol=1e-6).float().mean().item()
    assert 0.01 < frac < 0.12
    g.eval()
    assert torch.equal(g(x), g(x))
    g_nogate = SAGANGenerator(conv_dim=8, num_res_blocks=1, keep_prob=1.0).train()
    assert torch.equal(g_nogate(x), g_nogate(x))


def test_ablation_baseline_is_smaller_and_runs():
    base = SAGANGenerator(conv_dim=8, num_res_blocks=1, patches_per_side=1, position_code=False, attention_gates=False)
    full = SAGANGenerator(conv_dim=8, num_res_blocks=1)
    assert n_params(base) < n_params(full)
    assert base.gate1 is None and base.gate2 is None and base.gate3 is None
    assert not any(k.startswith("gate") for k in base.state_dict())
    assert base(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_switches_must_be_booleans():
    with pytest.raises(TypeError, match="attention_gates must be True or False, got 'false'"):
        SAGANGenerator(conv_dim=8, num_res_blocks=1, attention_gates="false")


def test_hparams_are_the_constructor_arguments():
    g = SAGANGenerator(conv_dim=16, keep_prob=0.9)
    assert g.hparams == {
        "in_channels": 1,
        "conv_dim": 16,
        "num_res_blocks": 6,
        "patches_per_side": 2,
        "position_code": True,
        "attention_gates": True,
        "keep_prob": 0.9,
    }
    d = SAGANCritic(conv_dim=4, num_layers=4, negative_slope=0.2)
    assert d.hparams == {"in_channels": 1, "conv_dim": 4, "num_layers": 4, "negative_slope": 0.2, "init": "default"}
    b = BrainomalyGenerator(conv_dim=8, num_res_blocks=2)
    assert b.hparams == {"in_channels": 1, "conv_dim": 8, "num_res_blocks": 2}
    for net in (g, d, b):
        rebuilt = type(net)(**json.loads(json.dumps(net.hparams)))  # JSON-able and enough to rebuild the net
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def state_dict_digest(net: nn.Module) -> str:
    text = "\n".join(f"{k}{list(v.shape)}" for k, v in net.state_dict().items())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# (keys in order + shapes) of the networks before they were made scriptable: saved checkpoints must keep loading
STATE_DICT_DIGESTS = [
    (SAGANGenerator, dict(patches_per_side=1, position_code=True, attention_gates=True), "6a42109fb1c322d6"),
    (SAGANGenerator, dict(patches_per_side=1, position_code=True, attention_gates=False), "9aa9fbfd055ce19e"),
    (SAGANGenerator, dict(patches_per_side=1, position_code=False, attention_gates=True), "c694cd8469cf87ee"),
    (SAGANGenerator, dict(patches_per_side=1, position_code=False, attention_gates=False), "8966194e5709611c"),
    (SAGANGenerator, dict(patches_per_side=2, position_code=True, attention_gates=True), "2d45e6151404addc"),
    (SAGANGenerator, dict(patches_per_side=2, position_code=True, attention_gates=False), "cbf17e1cbe591483"),
    (SAGANGenerator, dict(patches_per_side=2, position_code=False, attention_gates=True), "c694cd8469cf87ee"),
    (SAGANGenerator, dict(patches_per_side=2, position_code=False, attention_gates=False), "8966194e5709611c"),
    (SAGANCritic, dict(num_layers=4), "8cbd43eca7f63e02"),
]


@pytest.mark.parametrize("cls, kwargs, digest", STATE_DICT_DIGESTS)
def test_state_dict_structure_is_unchanged(cls, kwargs, digest):
    extra = dict(num_res_blocks=1) if cls is SAGANGenerator else {}
    assert state_dict_digest(cls(conv_dim=4, **extra, **kwargs)) == digest


def test_patch_discriminator_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="use bundle.networks.SAGANCritic"):
        old = PatchDiscriminator(conv_dim=4, num_layers=4)
    assert isinstance(old, SAGANCritic)
    new = SAGANCritic(conv_dim=4, num_layers=4)
    new.load_state_dict(old.state_dict(), strict=True)  # old checkpoints load into the new class
    assert old.hparams == new.hparams


def brainomaly_parameter_count(cin: int, c: int, r: int) -> int:
    """From the published layer list (Brainomaly ``model.py``): no conv has a bias; every IN has weight + bias."""
    conv = lambda k, n_in, n_out: k * k * n_in * n_out  # noqa: E731
    norm = lambda ch: 2 * ch  # noqa: E731
    return (
        conv(7, cin, c) + norm(c)  # main.0-1: 7x7 conv, IN
        + conv(4, c, 2 * c) + norm(2 * c)  # main.3-4: 4x4/2 conv, IN
        + conv(4, 2 * c, 4 * c) + norm(4 * c)  # main.6-7: 4x4/2 conv, IN
        + r * (2 * conv(3, 4 * c, 4 * c) + 2 * norm(4 * c))  # residual blocks: 2 x (3x3 conv, IN)
        + conv(4, 4 * c, 2 * c) + norm(2 * c)  # 4x4/2 transposed conv, IN
        + conv(4, 2 * c, c) + norm(c)  # 4x4/2 transposed conv, IN
        + conv(7, c, 1)  # 7x7 conv to one channel
    )  # fmt: skip


def test_brainomaly_parameter_count_matches_the_published_layer_list():
    # published widths (g_conv_dim 64, g_repeat_num 6), one input channel, written out layer by layer
    published_1ch = (
        (7 * 7 * 1 * 64 + 0) + 2 * 64  # conv 1->64 (weights + no bias), IN(64) affine
        + (4 * 4 * 64 * 128 + 0) + 2 * 128  # conv 64->128
        + (4 * 4 * 128 * 256 + 0) + 2 * 256  # conv 128->256
        + 6 * (2 * (3 * 3 * 256 * 256 + 0) + 2 * (2 * 256))  # six residual blocks
        + (4 * 4 * 256 * 128 + 0) + 2 * 128  # transposed conv 256->128
        + (4 * 4 * 128 * 64 + 0) + 2 * 64  # transposed conv 128->64
        + (7 * 7 * 64 * 1 + 0)  # conv 64->1, no norm
    )  # fmt: skip
    assert published_1ch == 8_402_304 == brainomaly_parameter_count(1, 64, 6)
    assert n_params(BrainomalyGenerator()) == published_1ch
    assert n_params(BrainomalyGenerator(in_channels=3)) == brainomaly_parameter_count(3, 64, 6) == 8_408_576
    for cin, c, r in ((1, 8, 3), (1, 16, 3), (1, 4, 0), (3, 8, 2)):
        assert n_params(BrainomalyGenerator(cin, c, r)) == brainomaly_parameter_count(cin, c, r)


def test_brainomaly_state_dict_has_the_published_keys():
    sd = BrainomalyGenerator(conv_dim=8, num_res_blocks=2).state_dict()
    # main: 0 conv, 1 IN, 2 ReLU, 3 conv, 4 IN, 5 ReLU, 6 conv, 7 IN, 8 ReLU, 9-10 residual blocks,
    # 11 transposed conv, 12 IN, 13 ReLU, 14 transposed conv, 15 IN, 16 ReLU, 17 conv
    assert {int(k.split(".")[1]) for k in sd} == {0, 1, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15, 17}
    assert sd["main.0.weight"].shape == (8, 1, 7, 7)
    assert sd["main.6.weight"].shape == (32, 16, 4, 4)
    assert sd["main.11.weight"].shape == (32, 16, 4, 4)  # ConvTranspose2d weights are (in, out, k, k)
    assert sd["main.17.weight"].shape == (1, 8, 7, 7)
    assert not any(f"main.{i}.bias" in sd for i in (0, 3, 6, 11, 14, 17))  # no conv has a bias
    assert {k for k in sd if k.startswith("main.10.")} == {
        f"main.10.main.{i}.{name}"
        for i, names in ((0, ["weight"]), (1, None), (3, ["weight"]), (4, None))
        for name in (names or ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"])
    }


def test_brainomaly_output_is_tanh_of_input_plus_map_and_eval_uses_image_statistics():
    torch.manual_seed(0)
    b = BrainomalyGenerator(conv_dim=4, num_res_blocks=1)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    b.train()
    with torch.no_grad():
        y_train = b(x)  # updates the running statistics
        m = b.additive_map(x)
    assert m.shape == (3, 1, 32, 32) and y_train.shape == x.shape and y_train.abs().max() < 1
    assert b.main[1].running_mean.abs().sum() > 0
    stats = {k: v.clone() for k, v in b.state_dict().items() if "running" in k}
    b.eval()
    with torch.no_grad():
        y_eval = b(x)
    # Brainomaly's published evaluation never calls eval(): per-image statistics in both modes
    torch.testing.assert_close(y_eval, y_train)
    torch.testing.assert_close(y_eval, torch.tanh(x + b.additive_map(x)))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in stats.items())  # eval leaves them alone
    rgb = BrainomalyGenerator(in_channels=3, conv_dim=4, num_res_blocks=1)  # as published: one map for 3 channels
    assert rgb.additive_map(torch.zeros(2, 3, 16, 16)).shape == (2, 1, 16, 16)
    assert rgb(torch.zeros(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        b(torch.zeros(1, 1, 30, 32))


def test_instance_norm_per_image_matches_torch():
    torch.manual_seed(0)
    ours = InstanceNormPerImage(5)
    ref = nn.InstanceNorm2d(5, affine=True, track_running_stats=True)
    nn.init.normal_(ours.weight), nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 6, 6) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x))  # train mode: same output, same running statistics
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    plain = nn.InstanceNorm2d(5, affine=True)
    plain.load_state_dict({"weight": ours.weight, "bias": ours.bias})
    torch.testing.assert_close(ours.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("after_norm", [False, True])
def test_position_code_reaches_the_output_only_after_the_norm(after_norm):
    """As published, each position block's instance norm subtracts the code's (patch-constant) contribution again,
    so four identical patches give four identical outputs; with ``position_code_after_norm`` they differ."""
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=8, num_res_blocks=1, position_code_after_norm=after_norm).eval()
    with torch.no_grad():
        for block in (m for m in g.modules() if isinstance(m, PositionBlock)):
            block.fuse.conv.weight[:, -g.encoding.num_bits :] *= 10  # a code the network has learnt to use
        patch = torch.rand(1, 1, 32, 32) * 2 - 1
        y = g(patch.repeat(1, 1, 2, 2))
    spread = (y[..., :32, :32] - y[..., 32:, 32:]).abs().max().item()
    assert (spread > 0.01) if after_norm else (spread < 1e-3), spread
    assert g.hparams.get("position_code_after_norm", False) is after_norm


@pytest.mark.parametrize("size", [6, 32])  # under 1024 pixels the CPU normalises an NCHW copy, from 1024 in place
def test_layout_aware_instance_norm_matches_instance_norm_with_gradients(size):
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(8, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    reference = nn.InstanceNorm2d(8, affine=True).double()
    reference.load_state_dict(norm.state_dict())
    norm.__class__ = LayoutAwareInstanceNorm2d
    x = (torch.randn(3, 8, size, size) * 4 + 2).to(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().contiguous().requires_grad_()
    g = torch.randn(3, 8, size, size)
    y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    grads = torch.autograd.grad(y, (x, norm.weight, norm.bias), g.to(memory_format=torch.channels_last))
    y64 = reference(x64)
    grads64 = torch.autograd.grad(y64, (x64, reference.weight, reference.bias), g.double())
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_layout_aware_instance_norm_keeps_layout_and_dtype():
    torch.manual_seed(0)
    norm = nn.InstanceNorm2d(8)
    norm.__class__ = LayoutAwareInstanceNorm2d
    x = (torch.randn(3, 8, 6, 6) * 4 + 2).to(memory_format=torch.channels_last)
    y = norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, nn.functional.instance_norm(x.contiguous()))
    xb = x.bfloat16()
    yb = norm(xb)
    assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
    # (normalised in float32, for speed only: the bfloat16 kernel gives the same values here)
    assert torch.equal(yb, nn.functional.instance_norm(xb.float().contiguous()).bfloat16())
