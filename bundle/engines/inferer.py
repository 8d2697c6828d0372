# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Inference under mixed precision on any device (MONAI's evaluators' ``amp`` autocasts on CUDA only)."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SimpleInferer

from ..checks import require_autocast_dtype

__all__ = ["AutocastInferer"]


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` whose network call runs under ``torch.autocast`` on the inputs' device (CPU or CUDA) when
    ``dtype`` is given; the output comes back as float32, so scores and heat maps are computed in float32.

    Args:
        dtype: ``None`` (float32 throughout, the default) or ``"bfloat16"``.

    (B, C, H, W) in [-1, 1] -> the network's output, float32, same shape.
    """

    def __init__(self, dtype: str | None = None) -> None:
        super().__init__()
        require_autocast_dtype("dtype", dtype)
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.dtype is None:
            return super().__call__(inputs, network, *args, **kwargs)
        with torch.autocast(inputs.device.type, dtype=getattr(torch, self.dtype)):
            out = super().__call__(inputs, network, *args, **kwargs)
        return out.float()
