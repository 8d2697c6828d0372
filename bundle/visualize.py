# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Pictures for people: image / restored / heat map grids, and the annotated extreme cases of an evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .transforms.scoring import anomaly_map

__all__ = ["column_titles", "restoration_grid", "save_extremes", "to_display"]


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


def column_titles(
    scores: Sequence[float], labels: Sequence[int] | None = None, threshold: float | None = None
) -> list[tuple[str, str]]:
    """(title, colour) per case: the score with 3 decimals and, with ``labels``, the true label ("0.123 / abnormal");
    with a ``threshold`` (``abnormal = score > threshold``) a false alarm (normal above it) or a miss (abnormal at or
    below it) gets a second line saying so, in red; the others are black."""
    titles = []
    for j, score in enumerate(scores):
        label = None if labels is None else int(labels[j])
        title = f"{float(score):.3f}" + ("" if label is None else f" / {'abnormal' if label else 'normal'}")
        error = None
        if label is not None and threshold is not None:
            if label == 0 and score > threshold:
                error = "false alarm"
            elif label == 1 and score <= threshold:
                error = "missed"
        titles.append((f"{title}\n{error}", "red") if error else (title, "black"))
    return titles


def save_extremes(
    path: str,
    images: torch.Tensor,
    restored: torch.Tensor,
    scores: Sequence[float],
    labels: Sequence[int] | None = None,
    threshold: float | None = None,
    n_high: int | None = None,
) -> None:
    """Writes a figure of K cases to ``path`` (PNG): one column per case with its input (top row), restored image
    (middle) and heat map |x - x'| clipped to [0, 1] (bottom), titled with its score and, when ``labels`` are given,
    its true label ("0.123 / abnormal"). With a ``threshold`` (``abnormal = score > threshold``) the titles of false
    alarms (normal above it) and misses (abnormal at or below it) are red and say so (:func:`column_titles`).

    Args:
        path: the PNG to write.
        images, restored: (K, 1, H, W) in [-1, 1], MONAI's (x, y) spatial order.
        scores: K anomaly scores in [0, 1].
        labels: K true labels (0 normal, 1 abnormal), or None (unknown).
        threshold: the model's operating threshold, or None.
        n_high: the first ``n_high`` columns are the highest scores and the rest the lowest: the figure says so.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(scores)
    if not (images.shape[0] == restored.shape[0] == k) or (labels is not None and len(labels) != k):
        raise ValueError(
            f"images {tuple(images.shape)}, restored {tuple(restored.shape)}, {k} scores and labels differ."
        )
    rows = [(images + 1) / 2, (restored + 1) / 2, anomaly_map(images, restored)]
    rows = [to_display(r.detach().float().cpu())[:, 0].clamp(0, 1).numpy() for r in rows]
    fig, axes = plt.subplots(3, k, figsize=(1.15 * k + 0.6, 4.3), dpi=100, squeeze=False)
    for j, (title, colour) in enumerate(column_titles(scores, labels, threshold)):
        axes[0, j].set_title(title, fontsize=7, color=colour)
        for i, cmap in enumerate(("gray", "gray", "inferno")):
            axes[i, j].imshow(rows[i][j], cmap=cmap, vmin=0, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, name in enumerate(("input", "restored", "|x - x'|")):
        axes[i, 0].set_ylabel(name, fontsize=8)
    heading = []
    if n_high is not None and 0 < n_high < k:
        heading.append(f"{n_high} highest scores (left), {k - n_high} lowest (right)")
    if threshold is not None:
        heading.append(f"threshold {threshold:.3f}" + ("; red: false alarm or missed" if labels is not None else ""))
    if heading:
        fig.suptitle("; ".join(heading), fontsize=8)
    fig.tight_layout()
    if n_high is not None and 0 < n_high < k:  # a line between the highest and the lowest scores
        left, right = axes[0, n_high - 1].get_position(), axes[0, n_high].get_position()
        x = (left.x1 + right.x0) / 2
        fig.add_artist(plt.Line2D([x, x], [0.02, 0.9], color="0.5", lw=1, transform=fig.transFigure))
    fig.savefig(path)
    plt.close(fig)
