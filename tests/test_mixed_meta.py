# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Batches mixing 2D images and one-slice volumes: metadata of other shapes survive collate and decollate."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch, list_data_collate

from bundle.transforms import DecodeMixedMetad, collate_mixed_meta


def item(spatial_shape, affine, name):
    meta = {"spatial_shape": np.asarray(spatial_shape), "affine": affine, "filename_or_obj": name}
    return {"image": MetaTensor(torch.rand(1, 8, 8), meta=meta)}


def test_each_item_gets_its_own_metadata_back():
    png = item((96, 80), torch.eye(3, dtype=torch.float64), "a.png")
    slab = item((70, 60, 1), torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=torch.float64)), "b.nii.gz")
    with pytest.raises(RuntimeError):  # what MONAI's own collate does with this batch
        list_data_collate([png, slab])
    batch = collate_mixed_meta([png, slab])
    assert batch["image"].shape == (2, 1, 8, 8)
    restored = [DecodeMixedMetad(keys="image")(d) for d in decollate_batch(batch)]
    for original, back in zip((png, slab), restored):
        meta = back["image"].meta
        assert np.array_equal(meta["spatial_shape"], original["image"].meta["spatial_shape"])
        assert torch.equal(meta["affine"], original["image"].meta["affine"])
        assert meta["filename_or_obj"] == original["image"].meta["filename_or_obj"]
        assert torch.equal(back["image"].as_tensor(), original["image"].as_tensor())
    assert isinstance(png["image"].meta["spatial_shape"], np.ndarray)  # the dataset's items are left as they were


def test_agreeing_metadata_collate_as_monai_does():
    items = [item((96, 80), torch.eye(3, dtype=torch.float64), f"{i}.png") for i in range(3)]
    ours, monai = collate_mixed_meta(items), list_data_collate(items)
    assert torch.equal(ours["image"], monai["image"])
    assert torch.equal(ours["image"].meta["spatial_shape"], monai["image"].meta["spatial_shape"])
    assert ours["image"].meta["filename_or_obj"] == monai["image"].meta["filename_or_obj"]
