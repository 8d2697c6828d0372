# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly regions from heat maps: smoothing (shared by training, which sets the pixel threshold, and inference),
thresholding, speck removal, bounding boxes, and mapping back to the input image's grid.

The heat map is |x - x'| at the model's grid (paper, Fig. 3: the difference between an image and its restored,
healthy version, whose abnormal regions the paper marks with boxes); a region is a connected set of pixels whose
smoothed heat exceeds the model's ``pixel_threshold`` (a high quantile of the smoothed heat maps of normal validation
images).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, MapTransform

__all__ = ["HEATMAP_SIGMA", "MIN_REGION_SIZE", "AnomalyRegionsd", "find_regions", "region_mask", "smooth_heatmap"]

HEATMAP_SIGMA = 1.0  # pixels of the 64x64 model grid
MIN_REGION_SIZE = 8  # pixels of the model grid: smaller connected sets are specks, not regions


def smooth_heatmap(heatmap: torch.Tensor, sigma: float = HEATMAP_SIGMA) -> torch.Tensor:
    """Gaussian-smoothed heat map: (..., H, W) -> same shape and dtype; values stay in the input's range.

    Leading dimensions (batch, channel) are treated as separate 2D maps."""
    flat = heatmap.reshape(-1, *heatmap.shape[-2:])
    smoothed = GaussianSmooth(sigma=sigma)(flat)  # MONAI treats the first dim as channels: 2D smoothing per map
    return torch.as_tensor(smoothed).reshape(heatmap.shape).to(heatmap.dtype)


def region_mask(
    heatmap: torch.Tensor, pixel_threshold: float, min_size: int = MIN_REGION_SIZE, sigma: float = HEATMAP_SIGMA
) -> tuple[np.ndarray, np.ndarray]:
    """Connected anomaly regions of one heat map at the model's grid.

    Args:
        heatmap: (H, W) or (1, H, W) heat map |x - x'|, values in [0, 2].
        pixel_threshold: a pixel is anomalous where the smoothed heat map is strictly above it.
        min_size: connected sets (8-connectivity) of fewer pixels are removed as specks; 0 or 1 keeps all.
        sigma: Gaussian smoothing in pixels (:data:`HEATMAP_SIGMA`, as used for ``pixel_threshold`` in training).

    Returns:
        ``labels``: (H, W) int32, 0 outside the regions and 1..K inside, numbered in scan order;
        ``smoothed``: (H, W) float32, the smoothed heat map (same range as ``heatmap``).
    """
    from skimage.measure import label as connected_components  # only region finding needs scikit-image

    if heatmap.ndim == 3 and heatmap.shape[0] == 1:
        heatmap = heatmap[0]
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be (H, W) or (1, H, W), got shape {tuple(heatmap.shape)}.")
    smoothed = smooth_heatmap(torch.as_tensor(heatmap).float().cpu(), sigma).numpy()
    labels = connected_components(smoothed > pixel_threshold, connectivity=2).astype(np.int32)
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_size)
        labels[np.isin(labels, small[small > 0])] = 0
        labels = connected_components(labels > 0, connectivity=2).astype(np.int32)  # renumber 1..K
    return labels, smoothed


def find_regions(
    labels: np.ndarray, smoothed: np.ndarray, spatial_size: Sequence[int] | None = None
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Maps model-grid regions onto an image grid and describes each.

    Args:
        labels: (h, w) int region labels from :func:`region_mask` (0 = background).
        smoothed: (h, w) smoothed heat map, values in [0, 2].
        spatial_size: (S0, S1) of the target grid (the input image's first two spatial axes); ``None`` keeps
            the model grid. Labels are resized with nearest-neighbour at pixel centres (``nearest-exact``).

    Returns:
        ``mapped``: (S0, S1) int32 region labels on the target grid (a region smaller than one target pixel may
        vanish when the target is coarser than the model grid; it is then not reported);
        ``regions``: one dict per region, highest ``peak_heat`` first: ``box`` ``[x_min, y_min, x_max, y_max]``
        inclusive pixel indices of the target grid (x along its first axis, y along its second), ``area`` (pixels
        of the target grid), ``peak_heat`` (maximum smoothed heat inside the region at the model grid, in [0, 2]).
    """
    from skimage.measure import regionprops

    if spatial_size is None:
        mapped = labels.astype(np.int32)
    else:
        size = tuple(int(s) for s in spatial_size)
        resized = torch.nn.functional.interpolate(
            torch.as_tensor(labels, dtype=torch.float32)[None, None], size=size, mode="nearest-exact"
        )
        mapped = resized[0, 0].round().to(torch.int32).numpy()
    peaks = {p.label: float(p.intensity_max) for p in regionprops(labels, intensity_image=smoothed)}
    regions = []
    for p in regionprops(mapped):
        x0, y0, x1, y1 = p.bbox  # exclusive upper bounds
        regions.append(
            {"box": [int(x0), int(y0), int(x1) - 1, int(y1) - 1], "area": int(p.area), "peak_heat": peaks[p.label]}
        )
    regions.sort(key=lambda r: r["peak_heat"], reverse=True)
    return mapped, regions


class AnomalyRegionsd(MapTransform):
    """Anomaly regions of a heat map, as a binary label image on the input image's grid and a list of boxes.

    Steps (the heat map is at the model's grid, e.g. 64x64): Gaussian smoothing (:func:`smooth_heatmap`),
    threshold at ``pixel_threshold``, removal of connected sets smaller than ``min_size`` pixels, nearest-neighbour
    mapping to the input grid read from the reference image's metadata (``spatial_shape``: the file's spatial
    shape as read, e.g. (W, H) of a PNG, (X, Y, Z) of a NIfTI or DICOM series), and bounding boxes there.

    A 3D input (a NIfTI volume or DICOM series of which one slice was scored) gets a label volume of the input's
    shape that is zero outside the scored slice, and each region records that ``slice``. ``slice_index`` is the
    slice the image loader used (``None`` for 2D inputs and single-slice volumes; negative values count from the
    end, as in :func:`bundle.transforms.load_grayscale`).

    Adds to the data:
        ``label_key``: uint8 MetaTensor (1, *spatial_shape) in {0, 1} (1 inside a region), carrying the reference
        image's original affine (its file's geometry) when there is one;
        ``regions_key``: list of dicts ``{"box": [x_min, y_min, x_max, y_max], "area", "peak_heat"}`` (see
        :func:`find_regions`; boxes are inclusive pixel indices along the input's first two spatial axes, for
        PNG/JPEG/DICOM the column and the row), plus ``"slice"`` for 3D inputs; highest ``peak_heat`` first.

    Args:
        keys: the heat map key, (1, h, w) |x - x'| in [0, 2] at the model grid.
        pixel_threshold: the model's pixel threshold (smoothed heat, [0, 2]); ``None`` gives no regions.
        ref_key: the image whose metadata gives the input grid; without metadata the model grid is used.
        slice_index: see above.
        min_size: minimum region size in model-grid pixels (:data:`MIN_REGION_SIZE`).
        sigma: smoothing in model-grid pixels (:data:`HEATMAP_SIGMA`).
    """

    def __init__(
        self,
        keys: str = "heatmap",
        pixel_threshold: float | None = None,
        ref_key: str = "image",
        slice_index: int | None = None,
        min_size: int = MIN_REGION_SIZE,
        sigma: float = HEATMAP_SIGMA,
        label_key: str = "anomaly_label",
        regions_key: str = "regions",
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError("AnomalyRegionsd takes exactly one heat map key.")
        self.pixel_threshold = pixel_threshold
        self.ref_key = ref_key
        self.slice_index = slice_index
        self.min_size = min_size
        self.sigma = sigma
        self.label_key = label_key
        self.regions_key = regions_key

    def _input_grid(self, d: Mapping, model_grid: tuple[int, int]) -> tuple[tuple[int, ...], Any]:
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        shape = meta.get("spatial_shape")
        spatial = tuple(int(s) for s in np.asarray(shape).ravel()) if shape is not None else model_grid
        affine = meta.get("original_affine", meta.get("affine"))
        if len(spatial) not in (2, 3):
            raise ValueError(f"'{self.ref_key}' has spatial shape {spatial}; a 2D image or a 3D volume is needed.")
        return spatial, affine

    def _slice(self, spatial: tuple[int, ...]) -> int | None:
        if len(spatial) == 2:
            return None
        depth = spatial[2]
        if self.slice_index is None:
            if depth != 1:
                raise ValueError(f"a volume of {depth} slices needs slice_index: which slice was scored?")
            return 0
        if not -depth <= self.slice_index < depth:
            raise ValueError(f"slice_index {self.slice_index} outside a volume of {depth} slices.")
        return self.slice_index % depth

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        heatmap = torch.as_tensor(d[self.keys[0]])
        model_grid = (int(heatmap.shape[-2]), int(heatmap.shape[-1]))
        spatial, affine = self._input_grid(d, model_grid)
        k = self._slice(spatial)
        if self.pixel_threshold is None:
            mapped, regions = np.zeros(spatial[:2], np.int32), []
        else:
            labels, smoothed = region_mask(heatmap, self.pixel_threshold, self.min_size, self.sigma)
            mapped, regions = find_regions(labels, smoothed, spatial[:2])
        label = np.zeros((1, *spatial), np.uint8)
        if k is None:
            label[0] = mapped > 0
        else:
            label[0, :, :, k] = mapped > 0
            for r in regions:
                r["slice"] = k
        meta = {"affine": torch.as_tensor(np.asarray(affine, np.float64))} if affine is not None else {}
        d[self.label_key] = MetaTensor(torch.from_numpy(label), meta=meta)
        d[self.regions_key] = regions
        return d
