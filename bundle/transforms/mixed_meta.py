# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Batches of images whose metadata differ in shape: a 2D PNG (``spatial_shape`` (2,), affine 3 x 3) beside a
one-slice NIfTI or DICOM volume (``spatial_shape`` (3,), affine 4 x 4). MONAI's collate stacks every metadata entry
and fails on such a batch; the pixels themselves are all (1, H, W) after resizing and stack fine."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, list_data_collate
from monai.transforms import MapTransform

__all__ = ["collate_mixed_meta", "DecodeMixedMetad", "MIXED_META_PREFIX"]

MIXED_META_PREFIX = "sagan-mixed-meta:"


def _encode(value: Any) -> str:
    is_tensor = isinstance(value, torch.Tensor)
    array = value.detach().cpu().numpy() if is_tensor else np.asarray(value)
    payload = {"tensor": is_tensor, "dtype": str(array.dtype), "data": array.tolist()}
    return MIXED_META_PREFIX + json.dumps(payload)


def _decode(text: str) -> np.ndarray | torch.Tensor:
    payload = json.loads(text[len(MIXED_META_PREFIX) :])
    array = np.asarray(payload["data"], dtype=payload["dtype"])
    return torch.as_tensor(array) if payload["tensor"] else array


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, np.number)) for v in value):
        return (len(value),)
    return None


def collate_mixed_meta(batch: Sequence[Mapping]) -> dict:
    """``monai.data.list_data_collate`` of a list of dicts, except that an array-valued metadata entry of a
    MetaTensor whose shape differs between the items, or which some items lack, travels as one JSON string per
    item (decollated per item by the evaluator); :class:`DecodeMixedMetad` turns it back into an array (or tensor)
    per item. Batches whose metadata agree are collated exactly as by ``list_data_collate``."""
    batch = [dict(item) for item in batch]
    for key in {k for item in batch for k, v in item.items() if isinstance(v, MetaTensor)}:
        tensors = [item.get(key) for item in batch]
        if not all(isinstance(t, MetaTensor) for t in tensors):
            continue
        mixed = []
        for name in {n for t in tensors for n in t.meta}:
            shapes = [_shape(t.meta[name]) if name in t.meta else "missing" for t in tensors]
            if all(s is not None for s in shapes) and len(set(shapes)) > 1:  # arrays (or absent) of other shapes
                mixed.append(name)
        if not mixed:
            continue
        for item, tensor in zip(batch, tensors):
            copy = tensor.clone()  # the dataset's own item keeps its metadata
            copy.meta = {**tensor.meta, **{name: _encode(tensor.meta[name]) for name in mixed if name in tensor.meta}}
            for name in mixed:
                copy.meta.setdefault(name, MIXED_META_PREFIX + "null")
            item[key] = copy
    return list_data_collate(batch)


class DecodeMixedMetad(MapTransform):
    """Restores, after decollation, the metadata entries :func:`collate_mixed_meta` carried as strings: each
    becomes the item's own array (or tensor: the affine), or is dropped where the item had none. Items without
    such entries pass unchanged."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, MetaTensor):
                continue
            encoded = {k: v for k, v in value.meta.items() if isinstance(v, str) and v.startswith(MIXED_META_PREFIX)}
            for name, text in encoded.items():
                if text == MIXED_META_PREFIX + "null":
                    del value.meta[name]
                else:
                    value.meta[name] = _decode(text)
        return d
