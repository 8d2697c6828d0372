# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The machine a figure was measured on (CPU model, GPU, threads, torch) and the code's commit, for benchmark
records, what its CPU can do, and the process-wide settings of a run: the memory allocator
(:func:`keep_freed_cpu_memory`) and cuDNN's choice of algorithms (:func:`set_cudnn_algorithms`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import subprocess

import torch

from .checks import require_bool

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


UNKNOWN_COMMIT = "unknown"


def source_commit(root: str) -> str:
    """The git commit of the checkout at ``root`` (``-dirty`` with uncommitted changes to tracked files), or
    :data:`UNKNOWN_COMMIT` when ``root`` is not the top of a git checkout (a release archive, a zoo download, a copy
    inside another repository) or git is not installed."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return UNKNOWN_COMMIT
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return UNKNOWN_COMMIT
    return commit + ("-dirty" if dirty else "")


def machine_info(device: torch.device | str | None = None) -> dict[str, str | int | None]:
    """``{"cpu", "gpu", "threads", "torch", "cores"}``: the CPU model from /proc/cpuinfo (``platform.processor()``
    elsewhere), the name of the CUDA ``device`` (default: the current one, when CUDA is available; ``None`` on a
    CPU-only machine or for a CPU ``device``), torch's intra-op threads, torch's version and the logical cores."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    gpu = torch.cuda.get_device_name(device) if use_cuda else None
    return {"cpu": cpu, "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cores": os.cpu_count()}  # fmt: skip


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU has bf16 arithmetic instructions (x86 AVX-512 BF16 or AMX-BF16, Arm BF16), from the first
    ``flags`` / ``Features`` line of /proc/cpuinfo; None where that cannot be read. Without them oneDNN emulates
    bf16, and bf16 autocast is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def keep_freed_cpu_memory(enabled: bool = True) -> bool:
    """Let glibc's ``malloc`` keep the memory of freed tensors for the next iteration's tensors: large blocks
    come from the heap instead of a fresh mapping each (``M_MMAP_MAX`` 0), and freed memory is not handed back to
    the system (``M_TRIM_THRESHOLD`` -1). By default every block above glibc's mmap threshold (128 KiB, raised up
    to 32 MiB as blocks are freed) is mapped, page-faulted in while it is written and unmapped when freed, at
    every iteration: on a CPU training run that costs several percent of the time (docs/performance.md, "CPU: the
    allocator"). The price: resident memory stays at its high-water mark instead of shrinking between iterations.

    Process-wide, from the call on: call it before training. The same as starting Python with
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`` in the environment. Returns whether it was applied:
    ``False`` with ``enabled`` false, and, with a warning, where the C library is not glibc (macOS, musl)."""
    if not enabled:
        return False
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        logging.getLogger(__name__).warning(
            "keep_freed_cpu_memory: the C library is not glibc (no mallopt); the allocator setting is skipped."
        )
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def set_cudnn_algorithms(deterministic: bool, benchmark: bool) -> None:
    """How cuDNN picks its convolution algorithms, process-wide: ``deterministic`` restricts it to algorithms that
    give the same result on every run; ``benchmark`` times the candidates at each new input shape (in the first
    iterations) and keeps the fastest. ``monai.utils.set_determinism`` with a seed sets (True, False), the training
    lists' default; PyTorch's own default is (False, False), under which the GPU figures of docs/performance.md were
    measured. Call it after ``set_determinism``. No effect on a CPU."""
    require_bool(deterministic=deterministic, benchmark=benchmark)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark
