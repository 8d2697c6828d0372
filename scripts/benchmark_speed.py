#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Speed benchmark: the authors' training loop, the bundle's engine and the engine with its speed switches, side by
side in one run, plus inference throughput, peak memory and the machine's matmul rate at that moment.

    python scripts/benchmark_speed.py --preset paper --batch 32 --repeats 2      # training, paper preset
    python scripts/benchmark_speed.py --preset cpu --repeats 3                   # training, cpu preset (batch 16)
    python scripts/benchmark_speed.py --preset paper --inference --repeats 3     # eval-mode G, batch 64
    python scripts/benchmark_speed.py --preset paper --batch 32 --memory         # peak RSS, one process per loop
    python scripts/benchmark_speed.py --preset paper --keep-freed-memory         # glibc keeps freed memory (all loops)
    python scripts/benchmark_speed.py --preset paper --loops authors --kept-memory-loops fast  # fast as shipped
    python scripts/benchmark_speed.py --preset paper --batch 8 --profile fast    # top operators of one iteration

Loops (``--loops``, default all three):

- ``authors``: the tensor work of the authors' published solver (SPEC.md, re-implemented here, not their code):
  every pass separate (critic step: G(x_u) with its graph kept, D(x_n), D(G(x_u)), gradient penalty; generator
  step every 2nd iteration: G(x_u) again, G(x_n), G(FPI(x_n)), with D's gradients computed too), NCHW layout,
  ``torch.optim.Adam`` with its CPU default (for-loop) implementation.
- ``engine``: ``SAGANTrainer`` as configured before this work (one G pass over cat(x_u, x_n, FPI(x_n)) reused by
  both steps, a no-grad G pass on critic-only iterations), default Adam, the networks' plain layers.
- ``fast``: ``SAGANTrainer(share_clean_patches=True, channels_last=True)`` with ``Adam(fused=True)`` and the
  networks' faster layers from ``bundle.acceleration`` (channels-last-aware instance norm and 1x1 convs; the
  critic's one-pixel convs).

The authors' and engine loops run the networks as ``bundle.networks`` builds them: plain layers.

One training "iteration" is the mean of a critic-only iteration and a generator iteration (n_critic = 2); every
repeat runs each loop on the same batches in turn (interleaved), and the table gives medians. Inputs are random
64x64 images in [-1, 1]; FPI(x_n) uses the bundle's ``RandForeignPatchInterpolation`` with another image of the batch
as donor, so the share of patches that the pasted patch touches is the training one. The matmul rate (float32,
2048 x 2048) is measured before every repeat: rates in the table are relative to it, so that they carry across
machines and loads. "Effective" GFLOP/s count the authors' FLOPs (``torch.utils.flop_counter``'s formulas on their
loop): work a loop leaves out counts as speed. ``--loops fast_plain_critic`` adds "fast" with the critic's plain
convolutions (an ablation); ``fast_bf16`` runs "fast" under bf16 autocast (``configs/presets/gpu.json``);
``fast_compiled`` and ``fast_bf16_compiled`` also compile the generator (minutes of compilation in the warm-up);
``fast_graphs`` and ``fast_bf16_graphs`` run whole iterations as CUDA graphs (``cuda_graphs``; GPU only), and
``fast_nchw_graphs`` / ``fast_nchw_bf16_graphs`` the same without ``channels_last``. A ``fusednorm`` loop
(``fast_bf16_fusednorm``, ``fast_fusednorm_graphs``, ``fast_bf16_fusednorm_graphs``) also runs the generator's
instance norms and the ReLUs after them as Triton kernels (``fused_instance_norm``; CUDA only, the CPU keeps the
unfused layers). A ``clcritic`` loop (``fast_clcritic``, ``fast_bf16_fusednorm_clcritic``,
``fast_bf16_fusednorm_clcritic_graphs``) puts the critic in channels-last layout too (``critic_channels_last``).
Every loop's table row also gives the FLOPs it does itself ("own", counted once on its eager form after the timing)
and its rate on them.
``--cudnn deterministic`` times the loops with the cuDNN flags that a training run sets (``set_determinism``),
``--cudnn benchmark`` autotuned; the default is PyTorch's.
``--device cuda`` runs everything on a GPU: synchronised timings, CUDA max allocated memory, the bf16 matmul rate
beside the float32 one (on a CPU the bf16 rate is measured when a bf16 loop runs); use ``--iters 10`` or more there
(one iteration takes tens of milliseconds). ``scripts/benchmark_gpu.sh`` runs the GPU stages in one go.

Timings on a shared machine are noisy: compare loops within one run only, and read the load average printed with
every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.acceleration import (  # noqa: E402
    fuse_instance_norm_relu,
    place_network,
    use_layout_aware_layers,
    use_one_pixel_convolutions,
    use_winograd_convolutions,
)
from bundle.engines import SAGANTrainer  # noqa: E402
from bundle.environment import keep_freed_cpu_memory, machine_info, set_cudnn_algorithms  # noqa: E402
from bundle.losses import SAGANCriticLoss, gradient_penalty  # noqa: E402
from bundle.networks import split_patches  # noqa: E402
from bundle.transforms import RandForeignPatchInterpolation  # noqa: E402

LOOPS = ("authors", "engine", "fast")
DEVICE = torch.device("cpu")  # --device
# "fast" with the critic's plain convolutions (an ablation); "fast" compiled, under bf16 autocast or both; "fast" as
# CUDA graphs, channels-last or NCHW, float32 or bf16
EXTRA_LOOPS = (
    "fast_plain_critic",
    "fast_compiled",
    "fast_bf16",
    "fast_bf16_compiled",
    "fast_graphs",
    "fast_bf16_graphs",
    "fast_nchw_graphs",
    "fast_nchw_bf16_graphs",
    "fast_bf16_fusednorm",
    "fast_fusednorm_graphs",
    "fast_bf16_fusednorm_graphs",
    "fast_clcritic",
    "fast_winograd",
    "fast_winograd_compiled",
    "fast_bf16_fusednorm_clcritic",
    "fast_bf16_fusednorm_clcritic_graphs",
)
# cuDNN's algorithm choice (--cudnn): PyTorch's default, what the training lists set (monai's set_determinism), or
# autotuned; (deterministic, benchmark) flags
CUDNN_MODES = {"pytorch": (False, False), "deterministic": (True, False), "benchmark": (False, True)}


def load() -> float:
    return os.getloadavg()[0]


def clock() -> float:
    """``time.perf_counter`` after the device's queued work is done."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    return time.perf_counter()


def matmul_gflops(size: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Matmul rate of the device now (best of ``reps``), GFLOP/s (8192 x 8192 on a GPU)."""
    size = 8192 if DEVICE.type == "cuda" else size
    a, b = (torch.randn(size, size, device=DEVICE, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * size**3 / best / 1e9


def build(preset: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """Generator, critic and the settings of configs/train.json merged with configs/presets/<preset>.json."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = [os.path.join(ROOT, "configs", "train.json")]
    if preset != "default":
        files.append(os.path.join(ROOT, "configs", "presets", f"{preset}.json"))
    parser.read_config(files)
    settings = {k: parser.get_parsed_content(k) for k in ("batch_size", "lr", "betas", "n_critic", "lambda_gp")}
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("discriminator_def"), settings


def make_batches(count: int, batch: int, size: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random normal / unlabeled images in [-1, 1] and FPI(normal), donor = the next image of the batch."""
    gen = torch.Generator().manual_seed(seed)
    fpi = RandForeignPatchInterpolation()
    fpi.set_random_state(seed)
    out = []
    for _ in range(count):
        x_n = torch.rand(batch, 1, size, size, generator=gen) * 2 - 1
        x_u = torch.rand(batch, 1, size, size, generator=gen) * 2 - 1
        donors = x_n.roll(1, 0)
        x_p = torch.stack([fpi(x_n[i], donors[i])[0] for i in range(batch)])
        out.append({k: v.to(DEVICE) for k, v in (("normal", x_n), ("unlabeled", x_u), ("pseudo", x_p))})
    return out


def touched_fraction(batches: list[dict], n: int) -> float:
    """Share of FPI(x_n) patches that the pasted patch touches (what ``share_clean_patches`` still computes)."""
    hits = [
        (split_patches(b["pseudo"], n) != split_patches(b["normal"], n)).flatten(1).any(1).float().mean()
        for b in batches
    ]
    return float(torch.stack(hits).mean())


class AuthorsLoop:
    """The authors' training loop, re-implemented from SPEC.md for timing (labelled "authors" in every table).

    Their solver, step by step: critic step every iteration with G(x_u) computed with its graph (not detached
    before the critic sees ``fake.detach()``), D(x_n) and D(G(x_u)) as two passes, gradient penalty on a per-sample
    mix; generator step every ``n_critic``-th iteration on the same batch, recomputing G(x_u) and running G(x_n)
    and G(FPI(x_n)) as separate passes; backward into G *and* D (D's gradients are reset before its next step);
    Adam with PyTorch's defaults.
    """

    def __init__(self, g: torch.nn.Module, d: torch.nn.Module, settings: dict) -> None:
        self.g, self.d, self.s = g, d, settings
        self.g_opt = torch.optim.Adam(g.parameters(), settings["lr"], betas=tuple(settings["betas"]))
        self.d_opt = torch.optim.Adam(d.parameters(), settings["lr"], betas=tuple(settings["betas"]))

    def iteration(self, it: int, batch: dict[str, torch.Tensor]) -> None:
        g, d = self.g.train(), self.d.train()
        x_n, x_u, x_p = batch["normal"], batch["unlabeled"], batch["pseudo"]
        fake = g(x_u)
        d_loss = -d(x_n).mean() + d(fake.detach()).mean() + self.s["lambda_gp"] * gradient_penalty(d, x_n, fake)
        self.g_opt.zero_grad()
        self.d_opt.zero_grad()
        d_loss.backward()
        self.d_opt.step()
        if it % self.s["n_critic"] == 0:
            fake = g(x_u)
            g_loss = -d(fake).mean() + (x_n - g(x_n)).abs().mean() + ((x_n - g(x_p)) ** 2).mean()
            self.g_opt.zero_grad()
            self.d_opt.zero_grad()
            g_loss.backward()
            self.g_opt.step()


class EngineLoop:
    """``SAGANTrainer._iteration`` driven directly (no data loader, no handlers)."""

    def __init__(
        self, g: torch.nn.Module, d: torch.nn.Module, settings: dict, fast: bool, bf16: bool = False,
        compiled: bool = False, graphs: bool = False, channels_last: bool | None = None,
        critic_channels_last: bool = False,
    ) -> None:  # fmt: skip
        opt_kw = {"fused": True} if fast else {}
        betas = tuple(settings["betas"])
        self.trainer = SAGANTrainer(
            device=DEVICE,
            max_epochs=1,
            train_data_loader=[],
            epoch_length=1,
            g_network=g,
            g_optimizer=torch.optim.Adam(g.parameters(), settings["lr"], betas=betas, **opt_kw),
            d_network=d,
            d_optimizer=torch.optim.Adam(d.parameters(), settings["lr"], betas=betas, **opt_kw),
            n_critic=settings["n_critic"],
            d_loss_function=SAGANCriticLoss(settings["lambda_gp"]),
            share_clean_patches=fast,
            channels_last=fast if channels_last is None else channels_last,
            critic_channels_last=critic_channels_last,
            autocast_dtype="bfloat16" if bf16 else None,
            compile_generator=compiled,
            cuda_graphs=graphs,
        )

    def iteration(self, it: int, batch: dict[str, torch.Tensor]) -> None:
        self.trainer.state.iteration = it
        self.trainer._iteration(self.trainer, batch)


def _kept_memory_child(conn, name: str, args: argparse.Namespace, batch: int) -> None:
    """Body of :class:`KeptMemoryLoop`'s process: glibc keeps freed memory here, then the loop runs each
    ``(iteration, batch index)`` it is sent, on the same batches as the parent's, until it is sent ``None``."""
    keep_freed_cpu_memory()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_cudnn_algorithms(*CUDNN_MODES[args.cudnn])
    batches = make_batches(2, batch) + make_batches(2, args.warmup_batch)
    step, _, _ = make_loop(name, args.preset)
    conn.send("ready")
    while (message := conn.recv()) is not None:
        step(message[0], batches[message[1]])
        conn.send("done")


class KeptMemoryLoop:
    """A loop in a process of its own where glibc keeps freed memory (``keep_freed_cpu_memory``, as the fast
    presets set it), while the other loops run with the default allocator: the allocator setting is process-wide.
    Calling it runs one iteration there and returns when it is done, so it is timed in turn with the others on
    the same batches (``batches``: the parent's, identified by identity; the child makes the same ones)."""

    def __init__(self, name: str, args: argparse.Namespace, batch: int, batches: list[dict]) -> None:
        self.batches = batches
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_kept_memory_child, args=(child, name, args, batch), daemon=True)
        self.process.start()
        child.close()
        self.conn.recv()

    def __call__(self, it: int, batch: dict) -> None:
        self.conn.send((it, next(i for i, b in enumerate(self.batches) if b is batch)))
        self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def make_loop(name: str, preset: str, eager: bool = False) -> tuple[Callable[[int, dict], None], dict, torch.nn.Module]:
    """Loop ``name``'s iteration function, its settings and its generator; ``eager``: without CUDA graphs and
    compilation (the same tensor work, run op by op)."""
    torch.manual_seed(0)
    g, d, settings = build(preset)
    g, d = g.to(DEVICE), d.to(DEVICE)  # plain layers: those the authors' code (and the engine before this work) ran
    if name not in ("authors", "engine"):
        g = use_layout_aware_layers(g)
    if name not in ("authors", "engine", "fast_plain_critic"):
        d = use_one_pixel_convolutions(d)
    if "fusednorm" in name:
        g = fuse_instance_norm_relu(g)
    if "winograd" in name:
        g = use_winograd_convolutions(g)
    if name == "authors":
        loop = AuthorsLoop(g, d, settings)
    else:
        loop = EngineLoop(
            g,
            d,
            settings,
            fast=name != "engine",
            bf16="bf16" in name,
            compiled=name.endswith("compiled") and not eager,
            graphs=name.endswith("graphs") and not eager,
            channels_last=False if "nchw" in name else None,
            critic_channels_last="clcritic" in name,
        )
    return loop.iteration, settings, g


class FlopCount(TorchDispatchMode):
    """Counts FLOPs with PyTorch's own formulas (``torch.utils.flop_counter``; convolutions, matrix products)
    without FlopCounterMode's module hooks, which the gradient penalty's ``autograd.grad`` does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def authors_flops(preset: str, batch: int) -> tuple[float, float]:
    """FLOPs of the authors' critic-only and generator iterations at ``batch`` (counted at batch 2, scaled)."""
    step, _, _ = make_loop("authors", preset)
    data = make_batches(1, 2)[0]
    counts = []
    for it in (1, 2):
        with FlopCount() as counter:
            step(it, data)
        counts.append(counter.total * batch / 2)
    return counts[0], counts[1]


def loop_flops(name: str, preset: str, data: list[dict]) -> float:
    """FLOPs per iteration (mean of a critic-only and a generator iteration) that loop ``name`` does on the timed
    batches ``data``, counted on its eager form: CUDA graphs and compiled code run the same convolutions and matrix
    products (the compiled generator's padding patches, about 5% more generator work, are not counted)."""
    step, _, _ = make_loop(name, preset, eager=True)
    total = 0
    for it, batch in ((1, data[0]), (2, data[1])):
        with FlopCount() as counter:
            step(it, batch)
        total += counter.total
    return total / 2


def time_training(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    _, _, settings = build(args.preset)
    batch = args.batch or settings["batch_size"]
    data = make_batches(2, batch)
    warm = make_batches(2, args.warmup_batch)
    loops = {name: make_loop(name, args.preset)[0] for name in args.loops}
    for name in args.kept_memory_loops:
        loops[f"{name}, kept memory"] = KeptMemoryLoop(name, args, batch, data + warm)
    for name, step in loops.items():  # warm-up: first-call costs (Adam states, oneDNN set-up, allocations)
        t = clock()
        step(1, warm[0])
        step(2, warm[1])
        if name.endswith("graphs"):  # CUDA graphs: warm up and capture at the timed batch's shapes
            for it in range(3, 11):
                step(it, data[(it + 1) % 2])  # as timed: odd (critic-only) data[0]
        print(f"warm-up {name}: {clock() - t:.1f} s, load {load():.1f}", flush=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in loops}
    rates, loads = [], []
    bf16_rates = []
    bf16 = DEVICE.type == "cuda" or any("bf16" in name for name in loops)
    for r in range(args.repeats):
        rates.append(matmul_gflops())
        if bf16:
            bf16_rates.append(matmul_gflops(dtype=torch.bfloat16))
        loads.append(load())
        for name, step in loops.items():
            critic_s = generator_s = 0.0
            for i in range(args.iters):  # critic-only iteration, then generator iteration
                it = 2 * (r * args.iters + i) + 3
                t0 = clock()
                step(it, data[0])
                t1 = clock()
                step(it + 1, data[1])
                critic_s, generator_s = critic_s + t1 - t0, generator_s + clock() - t1
            times[name].append((critic_s / args.iters, generator_s / args.iters))
            print(
                f"repeat {r + 1} {name}: critic-only {times[name][-1][0]:.4f} s, generator {times[name][-1][1]:.4f} s, "
                f"load {load():.1f}",
                flush=True,
            )
    for step in loops.values():
        if isinstance(step, KeptMemoryLoop):
            step.close()
    loops.clear()  # their networks and optimiser states, before the FLOP counts build new ones
    flops_c, flops_g = authors_flops(args.preset, batch)
    mm = statistics.median(rates)
    own_flops = {"authors": (flops_c + flops_g) / 2}
    rows = {}
    for name, ts in times.items():
        loop = name.removesuffix(", kept memory")
        if loop not in own_flops:
            t = clock()
            own_flops[loop] = loop_flops(loop, args.preset, data)
            print(f"FLOPs of {loop} counted in {clock() - t:.1f} s", flush=True)
        per_it = statistics.median([(c + g) / 2 for c, g in ts])
        eff = (flops_c + flops_g) / 2 / per_it / 1e9
        rows[name] = {
            "s_per_iteration": per_it,
            "critic_only_s": statistics.median([c for c, _ in ts]),
            "generator_s": statistics.median([g for _, g in ts]),
            "effective_gflops": eff,
            "effective_vs_matmul": eff / mm,
            "own_tflop_per_iteration": own_flops[loop] / 1e12,
            "own_vs_matmul": own_flops[loop] / per_it / 1e9 / mm,
        }
        if bf16_rates:
            rows[name]["effective_vs_bf16_matmul"] = eff / statistics.median(bf16_rates)
    if "authors" in rows:
        for row in rows.values():
            row["time_vs_authors"] = row["s_per_iteration"] / rows["authors"]["s_per_iteration"]
    n = getattr(build(args.preset)[0], "patches_per_side", 1)
    return {
        "preset": args.preset,
        "batch": batch,
        "repeats": args.repeats,
        "authors_tflop_per_iteration": (flops_c + flops_g) / 2 / 1e12,
        "touched_patch_fraction": touched_fraction(data, n),
        "matmul_gflops": rates,
        "bf16_matmul_gflops": bf16_rates,
        "load": loads + [load()],
        "loops": rows,
    }


def time_inference(args: argparse.Namespace) -> dict:
    batch = args.batch or 64
    torch.manual_seed(0)
    g_nchw = build(args.preset)[0].eval().to(DEVICE)
    g_cl = place_network(build(args.preset)[0].eval(), DEVICE, channels_last=True)
    g_cl.load_state_dict(g_nchw.state_dict())
    x = make_batches(1, batch)[0]["normal"]
    with FlopCount() as counter, torch.no_grad():  # (the dispatch mode sees nothing under inference_mode)
        g_nchw(x[:2])
    flops = counter.total * batch / 2
    nets = {"NCHW (engine, authors)": (g_nchw, None), "channels_last (fast)": (g_cl, None)}
    if DEVICE.type == "cpu":
        g_winograd = place_network(build(args.preset)[0].eval(), DEVICE, channels_last=True, winograd_convolutions=True)
        g_winograd.load_state_dict(g_nchw.state_dict())
        nets["channels_last + Winograd (fast, CPU)"] = (g_winograd, None)
    if args.inference_bf16:
        nets["channels_last + bf16 autocast"] = (g_cl, torch.bfloat16)
        if DEVICE.type == "cuda":
            g_fused = place_network(build(args.preset)[0].eval(), DEVICE, channels_last=True, fused_instance_norm=True)
            g_fused.load_state_dict(g_nchw.state_dict())
            nets["channels_last + bf16 autocast + fused instance norm"] = (g_fused, torch.bfloat16)
    times: dict[str, list[float]] = {k: [] for k in nets}
    rates, loads = [], []

    def forward(net: torch.nn.Module, dtype: torch.dtype | None) -> None:
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype is not None):
            net(x)

    with torch.inference_mode():
        for net, dtype in nets.values():
            forward(net, dtype)
        for _ in range(args.repeats):
            rates.append(matmul_gflops())
            loads.append(load())
            for name, (net, dtype) in nets.items():
                t = clock()
                forward(net, dtype)
                times[name].append(clock() - t)
    mm = statistics.median(rates)
    rows = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        rows[name] = {
            "s_per_batch": s,
            "images_per_s": batch / s,
            "gflops": flops / s / 1e9,
            "vs_matmul": flops / s / 1e9 / mm,
        }
    return {"preset": args.preset, "batch": batch, "gflop_per_batch": flops / 1e9, "matmul_gflops": rates,
            "load": loads + [load()], "inference": rows}  # fmt: skip


def memory_child(args: argparse.Namespace) -> None:
    """One process, one loop: peak RSS of a critic-only and a generator iteration (printed as JSON); CUDA-graph
    loops run four of each, so that the graphs are captured and replayed."""
    _, _, settings = build(args.preset)
    batch = args.batch or settings["batch_size"]
    data = make_batches(2, batch)
    step, _, _ = make_loop(args.memory_child, args.preset)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = DEVICE.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(DEVICE)
        cuda_before = torch.cuda.memory_allocated(DEVICE)
    for it in range(1, 9 if args.memory_child.endswith("graphs") else 3):
        step(it, data[(it + 1) % 2])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"loop": args.memory_child, "rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024}
    if cuda:
        row["cuda_before_mib"] = cuda_before / 2**20
        row["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(DEVICE) / 2**20
    print(json.dumps(row))


def measure_memory(args: argparse.Namespace) -> dict:
    rows = {}
    for name in args.loops:
        cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--memory-child", name]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--device", args.device] + (["--keep-freed-memory"] if args.keep_freed_memory else [])
        cmd += ["--cudnn", args.cudnn]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
        print(f"memory {name}: {rows[name]}, load {load():.1f}", flush=True)
    return {"preset": args.preset, "batch": args.batch, "memory": rows}


# the ATen operators whose own time is convolution or matrix-product arithmetic (``aten::_convolution``'s own time is
# the transposed convolutions', whose oneDNN call has no operator of its own)
DENSE_OPS = {
    "aten::convolution_backward",
    "aten::mkldnn_convolution",
    "aten::_convolution",
    "aten::cudnn_convolution",
    "aten::cudnn_convolution_transpose",
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
}


def profile(args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, _, settings = build(args.preset)
    batch = args.batch or settings["batch_size"]
    data = make_batches(2, batch)
    step, _, _ = make_loop(args.profile, args.preset)
    step(1, data[0])
    step(2, data[1])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step(3, data[0])
        step(4, data[1])
    print(f"# {args.profile} loop, preset {args.preset}, batch {batch}, one critic-only + one generator iteration")
    sort = "self_cuda_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=44))
    attr = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    dense = sum(getattr(e, attr) for e in events if e.key in DENSE_OPS)
    print(
        f"convolutions and matrix products ({', '.join(sorted(DENSE_OPS))}): {dense / 1e6:.3f} s of "
        f"{total / 1e6:.3f} s ({100 * dense / max(total, 1):.1f}%)"
    )
    if args.trace:
        prof.export_chrome_trace(args.trace)


def print_tables(result: dict) -> None:
    if "loops" in result:
        bf16 = result.get("bf16_matmul_gflops") or []
        print(
            f"\npreset {result['preset']}, batch {result['batch']}, {result['repeats']} repeats; authors' FLOPs "
            f"{result['authors_tflop_per_iteration']:.3f} TFLOP/iteration; matmul "
            f"{', '.join(f'{r:.0f}' for r in result['matmul_gflops'])} GFLOP/s"
            + (f" (bf16: {', '.join(f'{r:.0f}' for r in bf16)})" if bf16 else "")
            + f"; load {', '.join(f'{v:.1f}' for v in result['load'])}; FPI patches computed by 'fast': "
            f"{result['touched_patch_fraction']:.2f}"
            + ("; freed memory kept for reuse (every loop)" if result.get("keep_freed_memory") else "")
            + (f"; cuDNN {result['cudnn']}" if DEVICE.type == "cuda" else "")
        )
        print(
            "| loop | ms / iteration | critic-only ms | generator ms | x authors' time | effective GFLOP/s | x matmul |"
            + (" x bf16 matmul |" if bf16 else "")
            + " own TFLOP / iteration | own x matmul |"
        )
        print("|---|---|---|---|---|---|---|" + ("---|" if bf16 else "") + "---|---|")
        for name, r in result["loops"].items():
            print(
                f"| {name} | {1e3 * r['s_per_iteration']:.1f} | {1e3 * r['critic_only_s']:.1f} | "
                f"{1e3 * r['generator_s']:.1f} | {r.get('time_vs_authors', float('nan')):.2f} | "
                f"{r['effective_gflops']:.0f} | {r['effective_vs_matmul']:.2f} |"
                + (f" {r['effective_vs_bf16_matmul']:.3f} |" if bf16 else "")
                + f" {r['own_tflop_per_iteration']:.3f} | {r['own_vs_matmul']:.2f} |"
            )
    if "inference" in result:
        print(
            f"\ninference, preset {result['preset']}, batch {result['batch']} ({result['gflop_per_batch']:.0f} GFLOP); "
            f"matmul {', '.join(f'{r:.0f}' for r in result['matmul_gflops'])} GFLOP/s; load "
            f"{', '.join(f'{v:.1f}' for v in result['load'])}"
        )
        print("| layout | s / batch | images / s | GFLOP/s | x matmul |")
        print("|---|---|---|---|---|")
        for name, r in result["inference"].items():
            print(
                f"| {name} | {r['s_per_batch']:.2f} | {r['images_per_s']:.1f} | {r['gflops']:.0f} | "
                f"{r['vs_matmul']:.2f} |"
            )
    if "memory" in result:
        print(f"\npeak RSS, preset {result['preset']}, batch {result['batch']} (one process per loop)")
        print("| loop | RSS after set-up MiB | peak RSS MiB | CUDA after set-up MiB | CUDA max allocated MiB |")
        print("|---|---|---|---|---|")
        for name, r in result["memory"].items():
            cuda = [f"{r[k]:.0f}" if k in r else "-" for k in ("cuda_before_mib", "cuda_max_allocated_mib")]
            print(f"| {name} | {r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {cuda[0]} | {cuda[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", help="configs/presets/<name>.json, or 'default' (train.json)")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's batch_size (inference: 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--iters", type=int, default=1, help="timed iteration pairs per repeat (GPU: 10 or more)")
    parser.add_argument("--warmup-batch", type=int, default=2, help="batch of the warm-up iterations (training)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (GPU: CUDA max allocated memory too)")
    parser.add_argument("--loops", nargs="+", choices=LOOPS + EXTRA_LOOPS, default=list(LOOPS))
    parser.add_argument("--inference", action="store_true", help="eval-mode generator throughput instead")
    parser.add_argument("--inference-bf16", action="store_true", help="with --inference: a bf16 autocast row too")
    parser.add_argument("--memory", action="store_true", help="peak RSS of each loop, one process each")
    parser.add_argument("--profile", choices=LOOPS + EXTRA_LOOPS, default=None, help="torch.profiler table of a loop")
    parser.add_argument("--rows", type=int, default=25, help="operators in the --profile table")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--trace", default=None, help="with --profile: write a Chrome trace (chrome://tracing)")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse (bundle.environment.keep_freed_cpu_memory), for every loop",
    )
    parser.add_argument(
        "--kept-memory-loops",
        nargs="+",
        choices=LOOPS + EXTRA_LOOPS,
        default=[],
        help="training: these loops also run in a process of their own with glibc keeping freed memory (the fast "
        "presets' setting), timed in turn with the others, which keep the default allocator",
    )
    parser.add_argument(
        "--cudnn",
        choices=sorted(CUDNN_MODES),
        default="pytorch",
        help="cuDNN's algorithm choice for every loop: PyTorch's default, 'deterministic' (what the training lists "
        "set through monai's set_determinism, by default), or 'benchmark' (autotuned at each new shape)",
    )
    parser.add_argument("--memory-child", choices=LOOPS + EXTRA_LOOPS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not keep_freed_cpu_memory():
        sys.exit("--keep-freed-memory: this C library has no mallopt (not glibc)")
    set_cudnn_algorithms(*CUDNN_MODES[args.cudnn])
    if args.memory_child:
        memory_child(args)
        return
    if args.profile:
        profile(args)
        return
    info = machine_info(DEVICE)
    print(f"machine: {info}, load {load():.1f}", flush=True)
    if args.inference:
        result = time_inference(args)
    elif args.memory:
        result = measure_memory(args)
    else:
        result = time_training(args)
    result["machine"] = info
    result["keep_freed_memory"] = args.keep_freed_memory
    result["cudnn"] = args.cudnn
    result["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    print_tables(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
