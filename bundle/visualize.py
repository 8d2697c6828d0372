# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Pictures for people: image / restored / heat map grids."""

from __future__ import annotations

import torch

from .transforms.scoring import anomaly_map

__all__ = ["restoration_grid", "to_display"]


def to_display(x: torch.Tensor) -> torch.Tensor:
    """MONAI's (..., x, y) spatial order to display order (..., row, col)."""
    return x.transpose(-1, -2)


def restoration_grid(images: torch.Tensor, restored: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """A (1, 3*(H+pad), K*(W+pad)) grey picture in [0, 1]: inputs (top row), restored images (middle) and heat
    maps |x - x'| clipped to [0, 1] (bottom), one column per image. ``images``, ``restored``: (K, 1, H, W) in [-1, 1].
    """
    rows = [(images + 1) / 2, (restored + 1) / 2, anomaly_map(images, restored).clamp(0, 1)]
    rows = [torch.nn.functional.pad(to_display(r.detach().float().cpu()), (0, pad, 0, pad), value=1.0) for r in rows]
    return torch.cat([torch.cat(list(r[:, :1]), dim=-1) for r in rows], dim=-2).clamp(0, 1)
