# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The engine's speed-ups leave SAGAN's training unchanged: same losses and parameter updates as a straightforward
iteration written from the paper's equations (paper, Sec. 2.1, Eqs. 3-7), up to float32 rounding.

The straightforward iteration runs every pass separately, as the authors' solver does: G(x_u) for the critic step,
D(x_n) and D(G(x_u)) apart, then for the generator step G(x_u), G(x_n) and G(FPI(x_n)) again. The engine is run
as configured today (one G pass over cat(x_u, x_n, FPI(x_n)) reused by both steps) and with its speed switches:
``share_clean_patches`` (patches of FPI(x_n) that the pasted patch misses are taken from G(x_n)), ``channels_last``,
``critic_channels_last`` and the generator's Winograd convolutions (``winograd_convolutions``).

Delta masks are fixed by ``keep_prob = 1`` (no gating), so the only random draw is the gradient penalty's mixing
weight, seeded alike. Parameters are updated with SGD, so that an update is the gradient itself: Adam divides by
the running gradient size, which turns the float rounding of exactly-zero gradients (biases right before an
instance norm, and the position-code weights, whose contribution instance norm removes) into full-size steps in
any implementation.

The comparisons run in float64, where float rounding is far below any real difference (tolerance 1e-9), and in
float32 with the kernels of a real run, against the straightforward loop in the same memory layout (tolerance
2e-3 of the largest update: instance norms over 4x4 maps magnify float32 rounding). One thread: these are many
small operations.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bundle.acceleration import winograd as winograd_layers
from bundle.acceleration.patch_sharing import pad_to_bucket
from bundle.acceleration.winograd import use_winograd_convolutions
from bundle.engines import SAGANTrainer
from bundle.networks import SAGANCritic, SAGANGenerator, split_patches

B, N_ITER = 3, 4  # iterations 1..4: critic steps at every one, generator steps at 2 and 4
LR = 0.05


# tiny networks on 32x32 images (16x16 patches) for float64; the cpu preset's width on 64x64 for float32
SMALL = {"size": 32, "conv_dim": 4, "critic_layers": 5, "dtype": torch.float64}
REAL = {"size": 64, "conv_dim": 16, "critic_layers": 6, "dtype": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(size: int = 32, dtype: torch.dtype = torch.float64, with_unlabeled: bool = True) -> list[dict]:
    """Fixed batches whose FPI images cover every case of the patch sharing (N = 2): a pasted patch inside one
    patch, one across two, one across all four, and an image with nothing pasted (FPI with prob < 1)."""
    g = torch.Generator().manual_seed(0)
    h = size // 2
    # (rows, cols) of the pasted squares, relative to the patch border at h
    squares = [((3, 9), (h + 4, h + 11)), ((5, 12), (h - 6, h + 6)), ((h - 4, h + 5), (h - 5, h + 3))]
    out = []
    for _ in range(N_ITER):
        x_n = torch.rand(B + 1, 1, size, size, generator=g, dtype=dtype) * 2 - 1
        donor = torch.rand(B + 1, 1, size, size, generator=g, dtype=dtype) * 2 - 1
        x_p = x_n.clone()
        for i, (rows, cols) in enumerate(squares):
            alpha = float(torch.rand(1, generator=g))
            sl = (i, slice(None), slice(*rows), slice(*cols))
            x_p[sl] = (1 - alpha) * x_n[sl] + alpha * donor[sl]
        batch = {"normal": x_n, "pseudo": x_p}
        if with_unlabeled:
            batch["unlabeled"] = torch.rand(B + 1, 1, size, size, generator=g, dtype=dtype) * 2 - 1
        out.append(batch)
    return out


def networks(setting: dict) -> tuple[SAGANGenerator, SAGANCritic]:
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=setting["conv_dim"], num_res_blocks=1, keep_prob=1.0)
    d = SAGANCritic(conv_dim=4, num_layers=setting["critic_layers"])
    return g.to(setting["dtype"]), d.to(setting["dtype"])


def parameters(g: SAGANGenerator, d: SAGANCritic) -> dict[str, torch.Tensor]:
    return {**{"g." + k: v for k, v in g.state_dict().items()}, **{"d." + k: v for k, v in d.state_dict().items()}}


def reference_run(
    data: list[dict], setting: dict, channels_last: bool = False, winograd: bool = False
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """The straightforward loop: separate passes for every stream and step; returns per-iteration losses and the
    final parameters. ``channels_last``: G in that layout, ``winograd``: with its Winograd convolutions (other
    kernels, other float rounding)."""
    g, d = networks(setting)
    if channels_last:
        g.to(memory_format=torch.channels_last)
    if winograd:
        use_winograd_convolutions(g)
    g_opt, d_opt = torch.optim.SGD(g.parameters(), LR), torch.optim.SGD(d.parameters(), LR)
    torch.manual_seed(1)
    losses = []
    for it, batch in enumerate(data, start=1):
        x_n, x_p = batch["normal"], batch["pseudo"]
        x_u = batch.get("unlabeled")
        fake = g(x_u if x_u is not None else x_p)  # the authors keep this graph alive; it is not used again
        d_opt.zero_grad()
        d_real, d_fake = d(x_n).mean(), d(fake.detach()).mean()
        a = torch.rand(x_n.shape[0], 1, 1, 1, dtype=x_n.dtype)
        mixed = (a * x_n + (1 - a) * fake.detach()).requires_grad_(True)
        score = d(mixed)
        (grad,) = torch.autograd.grad(score, mixed, torch.ones_like(score), create_graph=True)
        norms = grad.flatten(1).norm(2, dim=1)
        gp = ((norms - 1) ** 2).mean()
        d_loss = -d_real + d_fake + 10.0 * gp
        d_loss.backward()
        d_opt.step()
        row = {"d_real": d_real.item(), "d_fake": d_fake.item(), "gp": gp.item(), "d_loss": d_loss.item()}
        row["d_grad_norm"] = norms.mean().item()
        if it % 2 == 0:
            g_opt.zero_grad()
            fake = g(x_u) if x_u is not None else g(x_p)
            adv = -d(fake).mean()
            identity = (x_n - g(x_n)).abs().mean()
            restoration = ((x_n - g(x_p)) ** 2).mean()
            g_loss = adv + identity + restoration
            g_loss.backward()  # also fills D's gradients, as the authors' code does; D's next step resets them
            g_opt.step()
            row.update(g_adv=adv.item(), g_identity=identity.item(), g_restoration=restoration.item())
            row["g_loss"] = g_loss.item()
        losses.append(row)
    return losses, parameters(g, d)


def engine_run(
    data: list[dict], setting: dict, pad_touched_patches: bool = False, winograd: bool = False, **switches
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """The engine with ``switches``; ``pad_touched_patches``: the padding ``compile_generator`` turns on, in eager
    mode (compilation takes minutes); ``winograd``: the generator's 3x3 convolutions as :class:`WinogradConv2d`."""
    g, d = networks(setting)
    if winograd:
        use_winograd_convolutions(g)
    trainer = SAGANTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=len(data),
        train_data_loader=data,
        g_network=g,
        g_optimizer=torch.optim.SGD(g.parameters(), LR),
        d_network=d,
        d_optimizer=torch.optim.SGD(d.parameters(), LR),
        **switches,
    )
    trainer.pad_touched_patches = pad_touched_patches
    losses = []

    @trainer.on(__import__("ignite").engine.Events.ITERATION_COMPLETED)
    def record(engine):
        row = {k: v.item() for k, v in engine.state.output.items()}
        if engine.state.iteration % 2:  # critic-only iteration: the generator terms are the previous ones
            row = {k: v for k, v in row.items() if k.startswith(("d_", "gp"))}
        losses.append(row)

    torch.manual_seed(1)
    trainer.run()
    return losses, parameters(g, d)


def assert_same_training(result, reference, initial, tol: float) -> None:
    losses, params = result
    ref_losses, ref_params = reference
    assert [set(r) for r in losses] == [set(r) for r in ref_losses]
    for row, ref in zip(losses, ref_losses):
        for key in ref:
            assert row[key] == pytest.approx(ref[key], rel=tol, abs=tol), key
    # parameter updates, measured against the largest update of the network they belong to
    for net in ("g.", "d."):
        names = [k for k in ref_params if k.startswith(net) and ref_params[k].is_floating_point()]
        scale = max((ref_params[k] - initial[k]).abs().max().item() for k in names)
        assert scale > 0
        for k in names:
            diff = (params[k] - ref_params[k]).abs().max().item()
            assert diff <= tol * scale, f"{k}: update differs by {diff:.3g} (largest update {scale:.3g})"


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return batches(SMALL["size"], SMALL["dtype"])


@pytest.fixture(scope="module")
def reference(data):
    return reference_run(data, SMALL)


@pytest.mark.parametrize("setting", [SMALL, REAL], ids=["float64", "float32"])
def test_fixture_covers_touched_and_untouched_patches(setting):
    for batch in batches(setting["size"], setting["dtype"]):
        touched = (split_patches(batch["pseudo"], 2) != split_patches(batch["normal"], 2)).flatten(1).any(1)
        assert touched.view(-1, 4).sum(1).tolist() == [1, 2, 4, 0]


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"share_clean_patches": True},
        {"channels_last": True},
        {"share_clean_patches": True, "channels_last": True},
        {"share_clean_patches": True, "channels_last": True, "critic_channels_last": True},
    ],
    ids=["engine", "shared_patches", "channels_last", "both", "channels_last_critic"],
)
def test_engine_matches_straightforward_iteration(data, reference, switches):
    assert_same_training(engine_run(data, SMALL, **switches), reference, parameters(*networks(SMALL)), 1e-9)


def test_padded_touched_patches_change_nothing(data, reference):
    """7 touched patches per batch, padded to 8 (a quarter of 16 patches): the extra patch's output is dropped."""
    result = engine_run(data, SMALL, pad_touched_patches=True, share_clean_patches=True, channels_last=True)
    assert_same_training(result, reference, parameters(*networks(SMALL)), 1e-9)


def test_pad_to_bucket():
    assert pad_to_bucket(torch.tensor([5, 2, 9]), 4).tolist() == [5, 2, 9, 5]
    assert pad_to_bucket(torch.tensor([5, 2, 9, 1]), 4).tolist() == [5, 2, 9, 1]
    assert pad_to_bucket(torch.tensor([], dtype=torch.long), 4).tolist() == []


def test_without_unlabeled_images_fpi_images_are_the_fakes():
    data = batches(SMALL["size"], SMALL["dtype"], with_unlabeled=False)
    result = engine_run(data, SMALL, share_clean_patches=True, channels_last=True)
    assert_same_training(result, reference_run(data, SMALL), parameters(*networks(SMALL)), 1e-9)


@pytest.mark.parametrize(
    "channels_last, winograd", [(False, False), (True, False), (True, True)], ids=["nchw", "channels_last", "winograd"]
)
def test_float32_run_matches_within_rounding(channels_last, winograd):
    """float32, real kernels. Compared with the straightforward loop in the same layout and with the same
    convolutions: the layout alone moves the first layer's update by about 1% of the largest update here, the
    Winograd convolutions alone by about 1.5% (float32 rounding of other kernels, magnified by instance norms over
    4x4 maps; in float64 both agree with the convolution, see test_winograd_run_matches_in_float64), the
    restructuring by about 0.01%."""
    data = batches(REAL["size"], REAL["dtype"])
    result = engine_run(data, REAL, share_clean_patches=True, channels_last=channels_last, winograd=winograd)
    reference = reference_run(data, REAL, channels_last=channels_last, winograd=winograd)
    assert_same_training(result, reference, parameters(*networks(REAL)), 2e-3)


def test_winograd_run_matches_in_float64(monkeypatch):
    """At 64x64 the bottleneck's maps are 4x4, where :class:`WinogradConv2d` computes the 3x3 convolutions by
    Winograd's F(4x4, 3x3): the whole training iteration stays the straightforward one in float64."""
    setting = {**REAL, "dtype": torch.float64}
    data = batches(setting["size"], setting["dtype"])
    calls = []
    function = winograd_layers._Winograd4x4
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: calls.append(a[0].shape) or apply(*a))
    result = engine_run(data, setting, winograd=True, share_clean_patches=True, channels_last=True)
    assert calls and all(shape[-2:] == (4, 4) for shape in calls)
    assert_same_training(result, reference_run(data, setting), parameters(*networks(setting)), 1e-9)


def test_shared_patches_share_their_delta_draw():
    """With gating on, an untouched patch of FPI(x_n) is G(x_n)'s patch itself (same delta draw); touched ones
    are computed for FPI(x_n). This is the switch's one difference from separate passes (paper, Eq. 1)."""
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1, keep_prob=0.5).double()
    opt = torch.optim.SGD(g.parameters(), LR)
    trainer = SAGANTrainer("cpu", 1, [], g, opt, SAGANCritic(conv_dim=4), opt, epoch_length=1, share_clean_patches=True)
    batch = batches()[0]
    plan = trainer.patch_plan(batch["normal"], batch["pseudo"])
    _, g_n, g_p = trainer._generator_pass(batch["normal"], batch["unlabeled"], batch["pseudo"], plan)
    p_n, p_p, p_x = split_patches(g_n, 2), split_patches(g_p, 2), split_patches(batch["pseudo"], 2)
    touched = (p_x != split_patches(batch["normal"], 2)).flatten(1).any(1)
    assert torch.equal(p_p[~touched], p_n[~touched])
    assert not torch.equal(p_p[touched], p_n[touched])


def test_switches_are_checked():
    g, d = networks(SMALL)
    opt = torch.optim.SGD(g.parameters(), LR)
    with pytest.raises(TypeError, match="share_clean_patches"):
        SAGANTrainer("cpu", 1, [], g, opt, d, opt, epoch_length=1, share_clean_patches="false")
    with pytest.raises(ValueError, match="autocast_dtype"):
        SAGANTrainer("cpu", 1, [], g, opt, d, opt, epoch_length=1, autocast_dtype="float16")


def test_resumed_optimizer_state_takes_the_parameters_layout():
    """A state saved in NCHW and resumed with ``channels_last`` is re-laid out before the first step: PyTorch's
    fused Adam reads parameter and state as flat memory and would mix elements up. (A loaded state dict also
    brings its ``fused`` flag: the saved run's optimiser is fused here.)"""
    g, d = networks(REAL)
    reference = copy.deepcopy(g)
    saved = torch.optim.Adam(reference.parameters(), fused=True)
    for p in reference.parameters():
        p.grad = torch.randn_like(p)
    saved.step()  # NCHW states, as a checkpoint of an NCHW run holds them
    opt = torch.optim.Adam(g.parameters(), fused=True)
    trainer = SAGANTrainer("cpu", 1, [], g, opt, d, torch.optim.SGD(d.parameters(), LR), epoch_length=1,
                           channels_last=True)  # fmt: skip
    opt.load_state_dict(copy.deepcopy(saved.state_dict()))
    g.load_state_dict(reference.state_dict())
    weight = g.down1[0].conv.weight
    assert opt.state[weight]["exp_avg"].stride() != weight.stride()
    trainer._align_optimizer_states(trainer)
    assert opt.state[weight]["exp_avg"].stride() == weight.stride()
    for p, q in zip(g.parameters(), reference.parameters()):
        q.grad = torch.randn_like(q)
        p.grad = torch.empty_like(p).copy_(q.grad)
    saved.step()
    opt.step()
    for p, q in zip(g.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("size, num_layers", [(64, 6), (32, 5), (128, 6)])
def test_critic_one_pixel_layers_match_convolutions(size, num_layers):
    """The critic's one-pixel layers (matrix products over the taps that meet the input) give the convolutions'
    scores and the gradients the gradient penalty needs (double backward), at sizes where the last layers are one
    pixel wide (64, 32) and where they are not (128, ordinary convolution)."""
    torch.manual_seed(0)
    critic = SAGANCritic(conv_dim=4, num_layers=num_layers).double()
    x = (torch.rand(2, 1, size, size, dtype=torch.float64) * 2 - 1).requires_grad_(True)

    def plain(x: torch.Tensor) -> torch.Tensor:
        for layer in critic.net:
            conv = layer if isinstance(layer, torch.nn.Conv2d) else layer.conv
            x = torch.nn.Conv2d._conv_forward(conv, x, conv.weight, conv.bias)
            for name, sub in layer.named_children():
                if name != "conv":
                    x = sub(x)
        return x

    outs = []
    for forward in (critic, plain):
        scores = forward(x)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
        params = torch.autograd.grad(scores.sum() + grad.pow(2).sum(), list(critic.parameters()))
        outs.append((scores, grad, params))
    (s1, g1, p1), (s2, g2, p2) = outs
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
