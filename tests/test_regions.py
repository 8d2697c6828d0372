# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Anomaly regions (bundle/transforms/regions.py): smoothing, threshold, speck removal, mapping to the input grid."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.transforms.regions import AnomalyRegionsd, find_regions, region_mask, smooth_heatmap


def heatmap() -> torch.Tensor:
    """(1, 64, 64): a 10x10 square of heat 1, a 3x3 blob of heat 2, one pixel of heat 2 (a speck)."""
    h = torch.zeros(1, 64, 64)
    h[0, 10:20, 30:40] = 1.0
    h[0, 50:53, 5:8] = 2.0
    h[0, 40, 50] = 2.0
    return h


def test_smooth_heatmap_keeps_shape_and_range():
    h = heatmap()
    s = smooth_heatmap(h)
    assert s.shape == h.shape and s.dtype == h.dtype
    assert 0.0 <= float(s.min()) and float(s.max()) <= 2.0
    assert float(s[0, 40, 50]) < 0.5  # a single hot pixel is smoothed away


def test_region_mask_threshold_and_specks():
    labels, smoothed = region_mask(heatmap(), 0.5, min_size=1)
    assert labels.dtype == np.int32 and labels.shape == smoothed.shape == (64, 64)
    sizes = sorted(int((labels == k).sum()) for k in range(1, labels.max() + 1))
    assert sizes == [13, 96]  # the square (corners at exactly 0.5 are out: strictly above) and the blob
    rows, cols = np.nonzero(labels == labels[15, 35])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 19, 30, 39)
    labels, _ = region_mask(heatmap(), 0.5, min_size=20)
    assert labels.max() == 1 and int((labels == 1).sum()) == 96  # the 13-pixel blob is a speck at min_size 20
    assert region_mask(heatmap(), 2.5)[0].max() == 0


def test_find_regions_maps_to_the_input_grid():
    labels = np.zeros((64, 64), np.int32)
    labels[10:20, 30:40] = 1
    smoothed = np.zeros((64, 64), np.float32)
    smoothed[15, 35] = 0.9
    mapped, regions = find_regions(labels, smoothed, (128, 96))
    assert mapped.shape == (128, 96)
    # nearest at pixel centres: rows 10..19 -> 20..39 (x2), columns 30..39 -> 45..59 (x1.5)
    assert regions == [{"box": [20, 45, 39, 59], "area": 20 * 15, "peak_heat": pytest.approx(0.9)}]
    assert int(mapped.sum()) == 300


def test_regions_sorted_by_peak_heat():
    labels = np.zeros((64, 64), np.int32)
    labels[0:5, 0:5], labels[30:35, 30:35] = 1, 2
    smoothed = np.zeros((64, 64), np.float32)
    smoothed[2, 2], smoothed[32, 32] = 0.6, 0.8
    _, regions = find_regions(labels, smoothed)
    assert [r["peak_heat"] for r in regions] == pytest.approx([0.8, 0.6])
    assert regions[0]["box"] == [30, 30, 34, 34]


def test_anomaly_regionsd_2d_input():
    image = MetaTensor(torch.zeros(1, 64, 64), meta={"spatial_shape": np.array([128, 96])})
    d = AnomalyRegionsd(pixel_threshold=0.5, min_size=20)({"heatmap": heatmap(), "image": image})
    label = d["anomaly_label"]
    assert label.shape == (1, 128, 96) and label.dtype == torch.uint8
    assert set(torch.unique(label).tolist()) == {0, 1}
    assert len(d["regions"]) == 1 and "slice" not in d["regions"][0]
    x0, y0, x1, y1 = d["regions"][0]["box"]
    assert int(label[0, x0 : x1 + 1, y0 : y1 + 1].sum()) == d["regions"][0]["area"] == int(label.sum())


def test_anomaly_regionsd_volume_slice_and_affine():
    affine = torch.diag(torch.tensor([0.5, 0.7, 2.0, 1.0], dtype=torch.float64))
    meta = {"spatial_shape": np.array([40, 30, 5]), "original_affine": affine.numpy()}
    image = MetaTensor(torch.zeros(1, 64, 64), meta=meta)
    d = AnomalyRegionsd(pixel_threshold=0.5, slice_index=-2)({"heatmap": heatmap(), "image": image})
    label = d["anomaly_label"]
    assert label.shape == (1, 40, 30, 5)
    assert torch.nonzero(label.sum(dim=(0, 1, 2))).flatten().tolist() == [3]
    assert all(r["slice"] == 3 for r in d["regions"]) and d["regions"]
    torch.testing.assert_close(label.affine, affine)


def test_anomaly_regionsd_without_threshold_or_metadata():
    d = AnomalyRegionsd(pixel_threshold=None)({"heatmap": heatmap(), "image": torch.zeros(1, 64, 64)})
    assert d["anomaly_label"].shape == (1, 64, 64) and int(d["anomaly_label"].sum()) == 0 and d["regions"] == []


@pytest.mark.parametrize("slice_index, message", [(None, "needs slice_index"), (5, "outside a volume of 5")])
def test_anomaly_regionsd_volume_errors(slice_index, message):
    image = MetaTensor(torch.zeros(1, 64, 64), meta={"spatial_shape": np.array([40, 30, 5])})
    with pytest.raises(ValueError, match=message):
        AnomalyRegionsd(pixel_threshold=0.5, slice_index=slice_index)({"heatmap": heatmap(), "image": image})
