# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The preprocessing of every image the bundle scores or trains on (paper, Sec. 3.1: grey, 64x64, [-1, 1])."""

from __future__ import annotations

from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRanged

from .io import LoadGrayscaleImaged

__all__ = ["preprocessing"]


def preprocessing(
    image_size: int, slice_index: int | None = None, keys: str = "image", keep_metadata: bool = False
) -> Compose:
    """Image file -> (1, image_size, image_size) float tensor in [-1, 1]: ``LoadGrayscaleImaged`` (one grey
    channel in [0, 1]; ``slice_index`` picks the slice of a 3D volume), ``Resized`` to ``image_size`` x
    ``image_size`` (bilinear, anti-aliased), ``ScaleIntensityRanged`` [0, 1] -> [-1, 1], then a plain tensor without
    metadata (``EnsureTyped``, ``track_meta=False``: what training and validation cache). With ``keep_metadata``
    the last step is left out and the image stays a ``MetaTensor``, as ``configs/inference.json``'s own
    ``preprocessing`` block (the same three transforms, kept equal by ``tests/test_bundle_config.py``) needs for
    its writers."""
    transforms = [
        LoadGrayscaleImaged(keys=keys, slice_index=slice_index),
        Resized(keys=keys, spatial_size=[image_size, image_size], mode="bilinear", anti_aliasing=True),
        ScaleIntensityRanged(keys=keys, a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0),
    ]
    if not keep_metadata:
        transforms.append(EnsureTyped(keys=keys, data_type="tensor", track_meta=False))
    return Compose(transforms)
