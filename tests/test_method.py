# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests that pin the SAGAN method itself (paper, Sec. 2.1, Eqs. 3-7; the anomaly score is the discrepancy between
an image and its restored healthy version, abstract, here mean|x - x'| / 2 in [0, 1]), not just that training runs:
the score formula on hand-made tensors, which tensors the critic and the generator receive on
critic-only and on generator iterations (normal and "0_u" settings), and that the trainer's single generator pass
over cat(x_u, x_n, FPI(x_n)) gives the losses, gradients and updates of separate passes.

Each test was checked against a hand-applied mutation of the code it guards (see docs/reliability.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.utils import AdversarialIterationEvents, set_determinism

from bundle.data import ImageCache, SAGANTrainingDataset
from bundle.engines import SAGANPrepareBatch, SAGANTrainer
from bundle.networks import SAGANCritic, SAGANGenerator
from bundle.transforms import AnomalyScored, RandForeignPatchInterpolationd
from bundle.transforms.scoring import anomaly_map, anomaly_score

SIZE, BATCH = 32, 4
G_KWARGS = dict(conv_dim=4, num_res_blocks=1, keep_prob=1.0)  # keep_prob 1: G is a deterministic function
D_KWARGS = dict(conv_dim=4, num_layers=4)


# --------------------------------------------------------------------------------------------- anomaly score


def test_anomaly_score_exact_values():
    x = torch.tensor([[[1.0, -1.0], [0.0, 0.5]]])  # (1, 2, 2) in [-1, 1]
    restored = torch.tensor([[[-1.0, -1.0], [0.5, 0.0]]])
    # |x - x'| = [2, 0, 0.5, 0.5]: mean 0.75, score = 0.75 / 2
    assert anomaly_score(x, restored).item() == 0.375
    assert torch.equal(anomaly_map(x, restored), torch.tensor([[[2.0, 0.0], [0.5, 0.5]]]))
    batch = torch.stack([torch.ones(1, 4, 4), torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5)])
    restored = torch.stack([-torch.ones(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)])
    # the extremes of [0, 1] (x = 1, x' = -1 -> 1; x' = x -> 0) and a constant 0.5 offset -> 0.25
    assert anomaly_score(batch, restored).tolist() == [1.0, 0.0, 0.25]


def test_anomaly_scored_transform_exact_values():
    image = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])
    pred = torch.tensor([[[0.5, -0.5], [1.0, 1.0]]])  # |diff| = [0.5, 0.5, 0, 2]: mean 0.75
    out = AnomalyScored(threshold=0.37)({"image": image, "pred": pred})
    assert out["score"].shape == (1,) and out["score"].item() == 0.375
    assert torch.equal(out["heatmap"], torch.tensor([[[0.5, 0.5], [0.0, 2.0]]]))
    assert out["abnormal"].item() == 1.0
    assert AnomalyScored(threshold=0.375)({"image": image, "pred": pred})["abnormal"].item() == 0.0  # strict >


# --------------------------------------------------------------------------------------------- trainer set-up


def in_memory(n: int, seed: int) -> ImageCache:
    g = torch.Generator().manual_seed(seed)
    return ImageCache(
        [{"image": torch.rand(1, SIZE, SIZE, generator=g) * 2 - 1} for _ in range(n)], transform=lambda d: d
    )


def build(
    unlabeled: bool, n_critic: int = 2, max_epochs: int = 1, epoch_length: int = 2, eps: float = 1e-8
) -> SAGANTrainer:
    """A tiny trainer on 8 random 32x32 pairs, batches of 4; ``eps`` is Adam's."""
    set_determinism(seed=0)
    g, d = SAGANGenerator(**G_KWARGS), SAGANCritic(**D_KWARGS)
    ds = SAGANTrainingDataset(
        in_memory(8, 0), in_memory(8, 1) if unlabeled else None, RandForeignPatchInterpolationd(keys="normal")
    )
    return SAGANTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(ds, batch_size=BATCH, shuffle=True, drop_last=True),
        g_network=g,
        g_optimizer=torch.optim.Adam(g.parameters(), 1e-3, betas=(0.5, 0.999), eps=eps),
        d_network=d,
        d_optimizer=torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999), eps=eps),
        epoch_length=epoch_length,
        n_critic=n_critic,
    )


class Recorder:
    """Records, per iteration, the batch streams, every input row given to G and to D with the phase of the
    iteration it came in, the network states before the iteration and after the critic step, and the losses."""

    PHASES = (
        (Events.ITERATION_STARTED, "forward"),
        (AdversarialIterationEvents.GENERATOR_FORWARD_COMPLETED, "critic_loss"),
        (AdversarialIterationEvents.DISCRIMINATOR_LOSS_COMPLETED, "critic_backward"),
        (AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED, "generator_loss"),
        (AdversarialIterationEvents.GENERATOR_LOSS_COMPLETED, "generator_backward"),
    )

    def __init__(self, trainer: SAGANTrainer):
        self.trainer = trainer
        self.iterations: list[dict] = []
        self.phase = "idle"
        inner = trainer.prepare_batch

        def prepare(batch, device=None, non_blocking=False, **kwargs):
            streams = inner(batch, device, non_blocking, **kwargs)
            self.current["streams"] = [None if s is None else s.detach().clone() for s in streams]
            return streams

        trainer.prepare_batch = prepare
        trainer.g_network.register_forward_hook(self._hook("G"))
        trainer.d_network.register_forward_hook(self._hook("D"))
        for event, name in self.PHASES:
            trainer.add_event_handler(event, self._set_phase, name)
        trainer.add_event_handler(Events.ITERATION_STARTED, self._start)
        trainer.add_event_handler(AdversarialIterationEvents.DISCRIMINATOR_MODEL_COMPLETED, self._after_critic_step)
        trainer.add_event_handler(AdversarialIterationEvents.GENERATOR_BACKWARD_COMPLETED, self._g_grads)
        trainer.add_event_handler(AdversarialIterationEvents.DISCRIMINATOR_BACKWARD_COMPLETED, self._d_grads)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._end)

    def _hook(self, net: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().clone()
            self.current["calls"].append((net, self.phase, x, torch.is_grad_enabled(), inputs[0].requires_grad))

        return hook

    def _set_phase(self, engine, name):
        self.phase = name

    def _start(self, engine):
        self.current = {
            "iteration": engine.state.iteration,
            "calls": [],
            "g0": copy.deepcopy(engine.g_network.state_dict()),
            "d0": copy.deepcopy(engine.d_network.state_dict()),
            "g_opt0": copy.deepcopy(engine.g_optimizer.state_dict()),
            "d_opt0": copy.deepcopy(engine.d_optimizer.state_dict()),
            "rng": torch.get_rng_state(),
            "g_stepped": False,
        }

    def _after_critic_step(self, engine):
        self.current["d1"] = copy.deepcopy(engine.d_network.state_dict())

    def _g_grads(self, engine):
        self.current["g_grads"] = [p.grad.detach().clone() for p in engine.g_network.parameters()]
        self.current["g_stepped"] = True

    def _d_grads(self, engine):
        self.current["d_grads"] = [p.grad.detach().clone() for p in engine.d_network.parameters()]

    def _end(self, engine):
        self.current["output"] = {k: v.detach().clone() for k, v in engine.state.output.items()}
        self.current["g1"] = copy.deepcopy(engine.g_network.state_dict())
        self.current["d1_end"] = copy.deepcopy(engine.d_network.state_dict())
        self.iterations.append(self.current)
        self.phase = "idle"


def networks(g_state: dict, d_state: dict) -> tuple[SAGANGenerator, SAGANCritic]:
    g, d = SAGANGenerator(**G_KWARGS), SAGANCritic(**D_KWARGS)
    g.load_state_dict(g_state)
    d.load_state_dict(d_state)
    return g.train(), d.train()


def rows_of(x: torch.Tensor) -> list[torch.Tensor]:
    return list(x.unbind(0))


class Catalogue:
    """Names each image row that went into a network: ``("x_n", i)``, ``("G(x_u)", i)``, ... or ``("mix", i, a)``
    for a gradient-penalty interpolation a * x_n[i] + (1 - a) * fake[i]."""

    def __init__(self, entries: dict[str, torch.Tensor], fake_name: str, atol: float = 1e-5):
        self.entries, self.fake_name, self.atol = entries, fake_name, atol

    def name(self, row: torch.Tensor) -> tuple:
        for key, x in self.entries.items():
            for i, ref in enumerate(rows_of(x)):
                if torch.allclose(row, ref, atol=self.atol, rtol=0):
                    return (key, i)
        real, fake = self.entries["x_n"], self.entries[self.fake_name]
        for i in range(real.shape[0]):
            direction = real[i] - fake[i]
            a = float((row - fake[i]).flatten() @ direction.flatten() / direction.flatten().square().sum())
            if -1e-6 <= a <= 1 + 1e-6 and torch.allclose(row, fake[i] + a * direction, atol=self.atol, rtol=0):
                return ("mix", i)
        return ("unknown",)


def names(catalogue: Catalogue, calls: list, net: str, phases: tuple[str, ...]) -> list[tuple]:
    out = []
    for who, phase, x, _, _ in calls:
        if who == net and phase in phases:
            out += [catalogue.name(r) for r in rows_of(x)]
    return sorted(out)


def each(name: str) -> list[tuple]:
    return [(name, i) for i in range(BATCH)]


# --------------------------------------------------------------------------------------------- routing


# Adam's first steps are lr * g / (|g| + eps): with eps 1e-8 a gradient of 1e-8 that differs in its last float32
# bits moves a weight by a different fraction of lr. eps 1e-3 keeps the update a smooth function of the gradient,
# so that float32 rounding in a gradient stays float32 rounding in the weights.
EPS = 1e-3


@pytest.fixture(scope="module", params=[True, False], ids=["with_unlabeled", "0_u"])
def recorded(request) -> tuple[bool, Recorder]:
    """Two recorded iterations (one critic-only, one with a generator step) per setting."""
    trainer = build(request.param, eps=EPS)
    rec = Recorder(trainer)
    trainer.run()
    return request.param, rec


def test_stream_routing(recorded):
    """Critic reals = x_n; critic fakes = G(x_u) (0_u: G(FPI(x_n))) on every iteration; generator adversarial
    term on the same fakes, identity on G(x_n), restoration on G(FPI(x_n)) vs x_n; with the loss values."""
    unlabeled, rec = recorded
    assert [it["iteration"] for it in rec.iterations] == [1, 2]
    fake_name = "G(x_u)" if unlabeled else "G(x_p)"
    for it in rec.iterations:
        x_n, x_u, x_p = it["streams"]
        assert (x_u is not None) == unlabeled
        generator_step = it["iteration"] % 2 == 0
        g0, d0 = networks(it["g0"], it["d0"])
        _, d1 = networks(it["g0"], it["d1"])
        with torch.no_grad():
            entries = {"x_n": x_n, "x_p": x_p, "G(x_n)": g0(x_n), "G(x_p)": g0(x_p)}
            if unlabeled:
                entries.update({"x_u": x_u, "G(x_u)": g0(x_u)})
        cat = Catalogue(entries, fake_name)
        source = "x_u" if unlabeled else "x_p"
        calls = it["calls"]

        # what G receives
        g_rows = names(cat, calls, "G", ("forward", "critic_loss", "generator_loss"))
        if generator_step:
            expected = sorted(each("x_n") + each("x_p") + (each("x_u") if unlabeled else []))
            assert sorted(set(g_rows)) == expected, "G must see x_u (if any), x_n and FPI(x_n) on G iterations"
            assert all(grad for who, _, _, grad, _ in calls if who == "G"), "G's pass must be differentiable"
        else:
            assert sorted(set(g_rows)) == each(source), f"critic-only iterations restore {source} only"
            assert not any(grad for who, _, _, grad, _ in calls if who == "G"), "no graph on critic-only steps"

        # what D receives in the critic loss: reals x_n, fakes G(x_u) / G(FPI(x_n)), one GP mix per sample
        d_rows = names(cat, calls, "D", ("critic_loss",))
        assert [r for r in d_rows if r[0] != "mix"] == sorted(each("x_n") + each(fake_name)), d_rows
        assert sorted(r for r in d_rows if r[0] == "mix") == each("mix"), "GP mixes x_n[i] with the fake[i]"
        with torch.no_grad():
            d_real, d_fake = d0(x_n).mean(), d0(entries[fake_name]).mean()
        out = it["output"]
        assert torch.allclose(out["d_real"], d_real, atol=1e-5), "critic's real term must be D(x_n)"
        assert torch.allclose(out["d_fake"], d_fake, atol=1e-5), f"critic's fake term must be D({fake_name})"
        assert torch.allclose(out["d_loss"], -d_real + d_fake + 10.0 * out["gp"], atol=1e-5)

        # what D receives in the generator loss: exactly the fakes, scored by the critic after its step
        adv_rows = names(cat, calls, "D", ("generator_loss",))
        if not generator_step:
            assert adv_rows == [] and not it["g_stepped"]
            continue
        assert adv_rows == each(fake_name), f"the adversarial term must score {fake_name}"
        assert any(
            who == "D" and phase == "generator_loss" and req for who, phase, _, _, req in calls
        ), "the adversarial term must carry a gradient to G (fakes not detached)"
        with torch.no_grad():
            g_adv = -d1(entries[fake_name]).mean()
            identity = (x_n - entries["G(x_n)"]).abs().mean()
            restoration = ((x_n - entries["G(x_p)"]) ** 2).mean()
        assert torch.allclose(out["g_adv"], g_adv, atol=1e-5), f"g_adv must be -D(G({source})) after the D step"
        assert torch.allclose(out["g_identity"], identity, atol=1e-6), "identity must be |x_n - G(x_n)|"
        assert torch.allclose(out["g_restoration"], restoration, atol=1e-6), "restoration: (x_n - G(FPI(x_n)))^2"
        assert torch.allclose(out["g_loss"], g_adv + identity + restoration, atol=1e-5)


# --------------------------------------------------------------------------------------------- combined pass


def separate_pass_step(it: dict, lr: float = 1e-3, eps: float = 1e-8) -> dict:
    """One SAGAN iteration written from the paper with separate generator passes (no shared batch), from the
    states recorded before the trainer's iteration; returns losses, gradients and updated parameters."""
    x_n, x_u, x_p = it["streams"]
    g, d = networks(it["g0"], it["d0"])
    g_opt = torch.optim.Adam(g.parameters(), lr, betas=(0.5, 0.999), eps=eps)
    d_opt = torch.optim.Adam(d.parameters(), lr, betas=(0.5, 0.999), eps=eps)
    g_opt.load_state_dict(copy.deepcopy(it["g_opt0"]))
    d_opt.load_state_dict(copy.deepcopy(it["d_opt0"]))
    torch.set_rng_state(it["rng"])  # the GP's mixing weights are the first random draw of the iteration
    source = x_u if x_u is not None else x_p
    with torch.no_grad():
        fake = g(source)
    d_opt.zero_grad()
    d_real, d_fake = d(x_n).mean(), d(fake).mean()
    a = torch.rand(x_n.shape[0], 1, 1, 1)
    mixed = (a * x_n + (1 - a) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(mixed).sum(), mixed, create_graph=True)
    gp = ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    d_loss = -d_real + d_fake + 10.0 * gp
    d_loss.backward()
    d_grads = [p.grad.clone() for p in d.parameters()]
    d_opt.step()
    result = {"d_real": d_real, "d_fake": d_fake, "gp": gp, "d_loss": d_loss, "d_grads": d_grads}
    if it["g_stepped"]:
        for p in d.parameters():
            p.requires_grad_(False)
        g_opt.zero_grad()
        g_adv = -d(g(source)).mean()
        identity = (x_n - g(x_n)).abs().mean()
        restoration = ((x_n - g(x_p)) ** 2).mean()
        g_loss = g_adv + identity + restoration
        g_loss.backward()
        result["g_grads"] = [p.grad.clone() for p in g.parameters()]
        g_opt.step()
        result.update(g_adv=g_adv, g_identity=identity, g_restoration=restoration, g_loss=g_loss)
    result["g1"], result["d1"] = g.state_dict(), d.state_dict()
    return result


def test_combined_generator_pass_equals_separate_passes(recorded):
    """Losses, gradients and Adam updates of the trainer's iteration (one G pass over cat(x_u, x_n, FPI(x_n)),
    G(x_u) reused by the critic and the generator step) equal those of separate passes, keep_prob = 1."""
    _, rec = recorded
    assert [it["g_stepped"] for it in rec.iterations] == [False, True]
    for it in rec.iterations:
        ref = separate_pass_step(it, eps=EPS)
        for key in ("d_real", "d_fake", "gp", "d_loss") + (
            ("g_adv", "g_identity", "g_restoration", "g_loss") if it["g_stepped"] else ()
        ):
            assert torch.allclose(it["output"][key], ref[key].detach(), rtol=1e-5, atol=1e-6), (key, it["iteration"])
        pairs = [("d_grads", it["d_grads"], ref["d_grads"])]
        if it["g_stepped"]:
            pairs.append(("g_grads", it["g_grads"], ref["g_grads"]))
        for what, got, want in pairs:
            for a, b in zip(got, want):
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (what, it["iteration"], (a - b).abs().max())
        for what, got, want in (("g", it["g1"], ref["g1"]), ("d", it["d1_end"], ref["d1"])):
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (what, k, it["iteration"])


def test_prepare_batch_streams():
    """The three streams come from their keys; no unlabeled key means the "0_u" setting (x_u is None)."""
    x = {k: torch.full((2, 1, 4, 4), float(i)) for i, k in enumerate(("normal", "unlabeled", "pseudo"))}
    x_n, x_u, x_p = SAGANPrepareBatch()(x, "cpu")
    assert (x_n.unique().item(), x_u.unique().item(), x_p.unique().item()) == (0.0, 1.0, 2.0)
    x_n, x_u, x_p = SAGANPrepareBatch()({"normal": x["normal"], "pseudo": x["pseudo"]}, "cpu")
    assert x_u is None and x_p.unique().item() == 2.0
