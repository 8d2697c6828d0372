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
