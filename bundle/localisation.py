# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""How well the heat maps find the lesions, where lesion masks are known (e.g. the demo set's).

The heat map |x - x'| (paper, Fig. 3) is compared with the lesion mask at the model's grid (64x64):

- ``pixel_auroc``: ROC AUC of the heat-map values over all pixels of the abnormal images with a mask, lesion
  pixels being the positives (the heat map as written by the bundle, not smoothed);
- ``peak_in_lesion``: the share of those images whose heat-map maximum after :func:`smooth_heatmap` lies inside
  the lesion;
- ``region_dice``: the mean Dice between the anomaly regions at the model's ``pixel_threshold`` (what inference
  reports, :func:`bundle.transforms.regions.region_mask`) and the lesion.

Masks are read by the images' own reader (:func:`bundle.transforms.load_grayscale`), so they share the images'
(x, y) axis order, then reduced to the model grid by area averaging (each model pixel gets the share of its source
pixels that are lesion) and thresholded at 0.5.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice
from monai.transforms import Compose, MapTransform

from .transforms.io import BadImageError, LoadGrayscaleImaged, load_grayscale
from .transforms.regions import region_mask, smooth_heatmap

__all__ = ["LoadLesionMaskd", "with_lesion_masks", "resize_mask", "pixel_auroc", "peak_in_lesion", "region_dice"]


def resize_mask(mask: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """A (C, X, Y) mask (non-zero = lesion) at (C, size, size) in {0, 1} float: area averaging (the share of lesion
    pixels under each output pixel), then >= 0.5."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    binary = (torch.as_tensor(mask).as_subclass(torch.Tensor) > 0).float()
    share = torch.nn.functional.interpolate(binary[None], size=size, mode="area")[0]
    return (share >= 0.5).float()


class LoadLesionMaskd(MapTransform):
    """Replaces the mask file name under ``keys`` (``""``: no mask) by a (1, size, size) float mask in {0, 1} and
    sets ``flag_key`` to 1 (mask given) or 0 (zeros stand in, so that a batch collates).

    Put it after the image loader and before the image is resized: the mask must have the image's spatial shape as
    read (checked against ``image_key``'s shape), and is read with the same reader and ``slice_index``.

    Raises:
        BadImageError: the mask cannot be read, or its shape differs from its image's (naming both files).
    """

    def __init__(
        self,
        keys: str = "mask",
        image_key: str = "image",
        spatial_size: int = 64,
        slice_index: int | None = None,
        flag_key: str = "has_mask",
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.spatial_size = int(spatial_size)
        self.slice_index = slice_index
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            path = d[key]
            if not path:
                d[key] = torch.zeros(1, self.spatial_size, self.spatial_size)
                d[self.flag_key] = 0
                continue
            mask = load_grayscale(path, self.slice_index)
            if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
                source = image.meta.get("filename_or_obj", "its image") if isinstance(image, MetaTensor) else "image"
                raise BadImageError(
                    str(path),
                    f"lesion mask of shape {tuple(mask.shape[1:])} does not match its image {source} of shape "
                    f"{tuple(image.shape[1:])}",
                )
            d[key] = resize_mask(mask, self.spatial_size)
            d[self.flag_key] = 1
        return d


def with_lesion_masks(preprocessing: Compose, spatial_size: int, mask_key: str = "mask") -> Compose:
    """``preprocessing`` (the bundle's: :class:`LoadGrayscaleImaged` first) with :class:`LoadLesionMaskd` right
    after the image loader, using its ``slice_index``; the image transforms are shared, not copied."""
    transforms = list(preprocessing.transforms)
    loaders = [i for i, t in enumerate(transforms) if isinstance(t, LoadGrayscaleImaged)]
    if not loaders:
        raise ValueError("the preprocessing has no LoadGrayscaleImaged: lesion masks cannot be read beside images.")
    i = loaders[0]
    mask = LoadLesionMaskd(mask_key, transforms[i].keys[0], spatial_size, transforms[i].slice_index)
    return Compose([*transforms[: i + 1], mask, *transforms[i + 1 :]])


def _as_maps(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(x).as_subclass(torch.Tensor).detach().float().cpu()
    return x.reshape(-1, *x.shape[-2:])


def pixel_auroc(heatmaps: torch.Tensor, masks: torch.Tensor) -> float:
    """ROC AUC of heat-map values as scores for lesion pixels: ``heatmaps`` and ``masks`` (N, [1,] H, W), masks in
    {0, 1}. Ties count one half (the Mann-Whitney statistic, as ``monai.metrics.compute_roc_auc``, computed from
    ranks so that millions of pixels take a fraction of a second). NaN when all pixels are lesion or none is."""
    scores = _as_maps(heatmaps).flatten().double()
    labels = _as_maps(masks).flatten() > 0.5
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # values strictly below each distinct value
    mid_rank = below.double() + (counts.double() + 1) / 2  # 1-based average rank of a tie group
    rank_sum = mid_rank[inverse[labels]].sum().item()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def peak_in_lesion(heatmaps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Per image, whether the maximum of the smoothed heat map (:func:`smooth_heatmap`; the first in row-major
    order on ties) lies inside the lesion: (N,) bool from (N, [1,] H, W) heat maps and {0, 1} masks."""
    smoothed = smooth_heatmap(_as_maps(heatmaps))
    flat_masks = _as_maps(masks).flatten(1)
    peaks = smoothed.flatten(1).argmax(dim=1)
    return (flat_masks.gather(1, peaks[:, None])[:, 0] > 0.5).numpy()


def region_dice(heatmaps: torch.Tensor, masks: torch.Tensor, pixel_threshold: float) -> np.ndarray:
    """Per image, the Dice of the anomaly regions at ``pixel_threshold`` (:func:`region_mask`: smoothed heat map
    above the threshold, specks removed) with the lesion mask: (N,) in [0, 1] (1 when both are empty)."""
    maps, lesions = _as_maps(heatmaps), (_as_maps(masks) > 0.5).float()
    regions = torch.stack([torch.from_numpy(region_mask(m, pixel_threshold)[0] > 0).float() for m in maps])
    dice = compute_dice(regions[:, None], lesions[:, None], include_background=True, ignore_empty=False)
    return dice[:, 0].numpy()
