# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The machine a figure was measured on (CPU model, GPU, threads, torch), for benchmark records."""

from __future__ import annotations

import os
import platform

import torch


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
