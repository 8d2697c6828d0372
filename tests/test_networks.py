import pytest
import torch

from bundle.networks import (
    PatchDiscriminator,
    PositionalConditionEncoding,
    SAGANGenerator,
    split_patches,
    stitch_patches,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_preset_parameter_counts():
    assert n_params(SAGANGenerator()) == 44_758_979
    assert n_params(PatchDiscriminator()) == 44_719_040


def test_shapes_and_range():
    g, d = SAGANGenerator(conv_dim=8, num_res_blocks=1), PatchDiscriminator(conv_dim=4)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.abs().max() < 1
    assert d(x).shape == (3, 1, 1, 1)
    assert PatchDiscriminator(conv_dim=4, num_layers=4)(x).shape == (3, 1, 4, 4)
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
    assert not hasattr(base, "gate1")
    assert base(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_switches_must_be_booleans():
    with pytest.raises(TypeError, match="attention_gates must be True or False, got 'false'"):
        SAGANGenerator(conv_dim=8, num_res_blocks=1, attention_gates="false")
