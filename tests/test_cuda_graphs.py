# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The ``cuda_graphs`` switch: whole training iterations captured as CUDA graphs train as the eager engine does.

The GPU tests run where CUDA is available (``scripts/benchmark_gpu.sh`` runs them first); the rest run anywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events

from bundle.acceleration.patch_sharing import touched_patch_plan
from bundle.engines import SAGANTrainer
from bundle.engines.cuda_graphs import prepare_optimizer_for_capture
from bundle.losses import SAGANCriticLoss
from bundle.networks import SAGANCritic, SAGANGenerator, split_patches
from bundle.transforms import RandForeignPatchInterpolation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
ITERATIONS = 16
# the generator's scheduler steps after critic-only iterations too, before its optimiser's first step
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return SAGANGenerator(conv_dim=16, num_res_blocks=2, keep_prob=1.0), SAGANCritic(conv_dim=16, num_layers=6)


def batches(device: str, count: int = ITERATIONS, batch: int = 8) -> list[dict[str, torch.Tensor]]:
    """Random images in [-1, 1] and FPI(x_n) (donor: the next image), as the benchmark makes them."""
    gen = torch.Generator().manual_seed(0)
    fpi = RandForeignPatchInterpolation()
    fpi.set_random_state(0)
    out = []
    for _ in range(count):
        x_n, x_u = (torch.rand(batch, 1, 64, 64, generator=gen) * 2 - 1 for _ in range(2))
        x_p = torch.stack([fpi(x_n[i], x_n.roll(1, 0)[i])[0] for i in range(batch)])
        out.append({"normal": x_n.to(device), "unlabeled": x_u.to(device), "pseudo": x_p.to(device)})
    return out


def make_trainer(g, d, data, **switches) -> tuple[SAGANTrainer, list[torch.optim.lr_scheduler.LambdaLR]]:
    """A trainer over ``data`` with fused Adam for both networks, and their schedulers (the lr cut to a tenth after
    8 steps through ``LambdaLR``, as the bundle's schedule), for the caller to step after each iteration."""
    g_opt = torch.optim.Adam(g.parameters(), 1e-3, betas=(0.5, 0.999), fused=True)
    d_opt = torch.optim.Adam(d.parameters(), 1e-3, betas=(0.5, 0.999), fused=True)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 if t < 8 else 0.1) for o in (g_opt, d_opt)]
    device = data[0]["normal"].device
    return SAGANTrainer(device, 1, data, g, g_opt, d, d_opt, epoch_length=len(data), **switches), schedulers


def half(*size, device=None, dtype=None, **_) -> torch.Tensor:
    """``torch.rand`` with every draw 0.5."""
    return torch.full(size, 0.5, device=device, dtype=dtype)


def copy_state(dst: SAGANTrainer, src: SAGANTrainer) -> None:
    """Weights and optimiser states of ``src`` into ``dst``, in place (a captured graph keeps its tensors)."""
    for net_d, net_s, opt_d, opt_s in (
        (dst.g_network, src.g_network, dst.g_optimizer, src.g_optimizer),
        (dst.d_network, src.d_network, dst.d_optimizer, src.d_optimizer),
    ):
        with torch.no_grad():
            for p, q in zip(net_d.parameters(), net_s.parameters()):
                p.copy_(q)
                for key, value in opt_s.state.get(q, {}).items():
                    opt_d.state[p][key].copy_(value)


def step_distances(data: list[dict[str, torch.Tensor]], bf16: bool) -> list[dict[str, float]]:
    """``data``'s iterations with an eager and a graph trainer, the graph one reset to the eager one's weights and
    optimiser states before each: per iteration, the largest relative difference of a loss term and, per network,
    ||graph update - eager update|| / ||eager update|| over the weights (biases right before an instance norm get
    float-rounding gradients, which Adam turns into lr-sized steps of either sign). Also checks that both fire the
    same events in the same order and that graphs were replayed. Fused Adam, the lr cut to a tenth after
    iteration 8 (``LambdaLR``, as the bundle's schedule: a graph that kept the lr of its capture would update 10x
    too much), no delta gating, the gradient penalty weighted 10 with its mixing weights fixed at 0.5 (a graph
    draws them from another random stream), so that its double backward is compared too."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    g, d = networks()
    trainers, schedulers, events = [], [], []
    for graphs in (False, True):
        trainer, scheds = make_trainer(
            copy.deepcopy(g).cuda(), copy.deepcopy(d).cuda(), data, d_loss_function=SAGANCriticLoss(lambda_gp=10.0),
            share_clean_patches=True, channels_last=True, autocast_dtype="bfloat16" if bf16 else None,
            cuda_graphs=graphs,
        )  # fmt: skip
        fired: list[str] = []
        for event in trainer._allowed_events:
            if "COMPLETED" in str(event) and event not in (Events.EPOCH_COMPLETED, Events.COMPLETED):
                trainer.add_event_handler(event, lambda _, e=event, f=fired: f.append(str(e)))
        trainers.append(trainer)
        schedulers.append(scheds)
        events.append(fired)
    eager, graph = trainers
    rows = []
    for it, batch in enumerate(data, start=1):
        if it > 1:
            copy_state(graph, eager)
        before = [[p.detach().clone() for p in t.g_network.parameters()] for t in trainers]
        before_d = [[p.detach().clone() for p in t.d_network.parameters()] for t in trainers]
        outs = []
        for trainer in trainers:
            trainer.state.iteration = it
            outs.append(trainer._iteration(trainer, batch))
        row = {"loss": max(abs(outs[1][k] - v).item() / (abs(v).item() + 1e-2) for k, v in outs[0].items() if v == v)}
        # detached: a graph node kept alive from here (the default stream) would break the next capture
        for name, nets, start in (("g", "g_network", before), ("d", "d_network", before_d)):
            upd = [
                [(p.detach() - p0) for p, p0 in zip(getattr(t, nets).parameters(), b) if p.dim() > 1]
                for t, b in zip(trainers, start)
            ]
            norm = sum(u.float().pow(2).sum() for u in upd[0]).item() ** 0.5
            if norm > 0:
                diff = sum((a - b).float().pow(2).sum() for a, b in zip(upd[1], upd[0])).item() ** 0.5
                row[name] = diff / norm
        rows.append(row)
        for group in schedulers:
            for s in group:
                s.step()
    assert graph._graphs.replays >= 8
    assert events[0] == events[1] and "AdversarialIterationEvents.GENERATOR_MODEL_COMPLETED" in events[0]
    return rows


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_graph_iterations_step_as_eager_iterations(bf16, monkeypatch):
    """Every iteration, from the same weights and optimiser states, a graph replay (or its eager warm-up) gives
    the eager iteration's losses and updates within float rounding. Two whole runs cannot be compared this way:
    cuDNN's and index_add's atomics, or another convolution algorithm inside a capture, part them by a quarter of
    the largest weight within 16 iterations (Adam scales near-zero gradients up), in eager code alone too."""
    data = batches("cuda")
    monkeypatch.setattr(torch, "rand", half)  # the one torch.rand of an iteration: the penalty's mixing weights
    rows = step_distances(data, bf16)
    worst = {k: max(r.get(k, 0.0) for r in rows) for k in ("loss", "g", "d")}
    print(f"graphs vs eager per step ({'bf16' if bf16 else 'float32'}): largest {worst}")
    loss_tol, update_tol = (0.05, 0.3) if bf16 else (1e-3, 0.1)
    assert worst["loss"] <= loss_tol, rows
    assert worst["g"] <= update_tol and worst["d"] <= update_tol, rows


@needs_cuda
def test_checkpointed_graph_optimizer_resumes_without_graphs():
    """A graph run's optimiser (device lr tensor, capturable steps) resumed in an eager run steps as usual."""
    g, d = networks()
    g, d = g.cuda(), d.cuda()
    data = batches("cuda", count=8)  # the critic-only kind's third iteration is captured
    trainer, _ = make_trainer(g, d, data, cuda_graphs=True)
    trainer.run()
    assert trainer._graphs.replays > 0
    state = copy.deepcopy(trainer.g_optimizer.state_dict())
    assert torch.is_tensor(state["param_groups"][0]["lr"])
    g_opt = torch.optim.Adam(g.parameters(), fused=True)
    g_opt.load_state_dict(state)
    eager = SAGANTrainer("cuda", 1, data, g, g_opt, d, torch.optim.Adam(d.parameters()), epoch_length=8)
    eager.run()
    assert isinstance(g_opt.param_groups[0]["lr"], float) and not g_opt.param_groups[0]["capturable"]


def test_cuda_graphs_are_refused_off_cuda():
    g, d = networks()
    opt = torch.optim.Adam(g.parameters())
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        SAGANTrainer("cpu", 1, [], g, opt, d, opt, epoch_length=1, cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs"):
        SAGANTrainer("cpu", 1, [], g, opt, d, opt, epoch_length=1, cuda_graphs="true")


def test_capture_settings_are_undone_on_the_cpu():
    """A checkpoint of a CUDA-graph run brings a tensor lr and ``capturable`` steps into the optimiser; a CPU run
    (which refuses capturable steps) turns them back before its first step."""
    g, d = networks()
    opt = torch.optim.Adam(g.parameters(), 1e-3)
    prepare_optimizer_for_capture(opt, torch.device("cpu"))
    trainer = SAGANTrainer("cpu", 1, [], g, opt, d, torch.optim.Adam(d.parameters()), epoch_length=1)
    for p in g.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(AssertionError, match="capturable=True"):
        opt.step()
    trainer._align_optimizer_states(trainer)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and not opt.param_groups[0]["capturable"]


def test_padded_plan_sends_padding_to_a_spare_row():
    """Two images, four patches each: the pasted pixels reach patches 0 and 2 of the first image and patch 1 of the
    second (index 5). Padded to a multiple of 4, the computed list repeats the first touched patch and its result
    goes to row 8, past the real patches."""
    x_n = torch.zeros(2, 1, 8, 8)
    x_p = x_n.clone()
    x_p[0, 0, 3:5, 3] = 1.0  # rows 3-4 at column 3: patches 0 and 2 of image 0
    x_p[1, 0, 1, 6] = 1.0  # patch 1 of image 1
    p_n, p_p = split_patches(x_n, 2), split_patches(x_p, 2)
    computed, dest = touched_patch_plan(p_n, p_p)
    assert computed.tolist() == dest.tolist() == [0, 2, 5]
    computed, dest = touched_patch_plan(p_n, p_p, bucket=4)
    assert computed.tolist() == [0, 2, 5, 0] and dest.tolist() == [0, 2, 5, 8]
