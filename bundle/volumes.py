# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Scoring 3D volumes slice by slice at inference: which slices of a volume are scored, the data items that ask the
image loader for them, and how their rows are named in scores.csv.

SAGAN is a 2D method. A 3D NIfTI volume given to ``run inferring`` becomes one data item per slice along
``slice_axis`` that holds enough foreground (:func:`foreground_slices`); each is loaded, scored and thresholded as a
2D image (:func:`bundle.transforms.io.load_grayscale_slice`: min-max scaled over the slice, as a 2D image is), gets a
row ``<file>#slice=<k>`` in scores.csv (:func:`score_row_meta`), and
:class:`bundle.handlers.VolumeAggregator` gathers the slices of each volume into volumes.csv and 3D NIfTI heat and
label maps in the volume's geometry.

The foreground rule (:func:`foreground_slices`): with ``low`` the volume's 1st and ``high`` its 99th intensity
percentile, a voxel is foreground when it is above ``low + 0.05 * (high - low)``, and a slice is scored when at least
5% of its pixels are foreground. Percentiles rather than the minimum and maximum, so that a few outliers (a metal
artefact, a hot voxel, padding below the air value of a CT) move the level little; 5% of the range separates the
background of MRI (zero or noise) and the air of CT (-1000 HU, while fat is about -100 HU) from tissue; and 5% of the
pixels drops the empty slices at the ends of a brain MRI or CT and the caps where a few pixels of anatomy would be
stretched over the full range by the slice's own min-max scaling and scored as noise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import DatalistError
from .transforms.io import (
    SLICE_AXIS_KEY,
    SLICE_INDEX_KEY,
    BadImageError,
    header_size,
    make_loader,
    read_volume,
    volume_slice,
)
from .transforms.mixed_meta import DecodeMixedMetad

__all__ = [
    "FOREGROUND_LEVEL",
    "FOREGROUND_SHARE",
    "VOLUME_SUFFIXES",
    "expand_volumes",
    "foreground_slices",
    "score_row_meta",
    "slice_row_name",
]

logger = logging.getLogger(__name__)

FOREGROUND_LEVEL = 0.05  # share of the volume's robust intensity range (1st..99th percentile) above its 1st percentile
FOREGROUND_SHARE = 0.05  # share of a slice's pixels that must be foreground for the slice to be scored
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # the inputs scored slice by slice (DICOM series and multi-frame: not yet)


def foreground_slices(
    volume: np.ndarray | torch.Tensor,
    slice_axis: int = -1,
    level: float = FOREGROUND_LEVEL,
    share: float = FOREGROUND_SHARE,
) -> list[int]:
    """The slices of a volume that hold enough foreground to be scored (the rule in this module's docstring).

    Args:
        volume: (S0, S1, S2) intensities in any range (raw values: HU, MRI signal, ...); NaN and infinite values
            are ignored when the level is set and never count as foreground.
        slice_axis: the axis slices are taken along (0, 1, 2 or -3..-1).
        level: foreground is above ``p1 + level * (p99 - p1)`` of the volume's finite values.
        share: a slice counts when at least this share of its pixels is foreground.

    Returns:
        The indices along ``slice_axis`` (non-negative, ascending) of the slices to score; empty for a constant
        volume or one without finite values.
    """
    values = torch.as_tensor(volume).detach().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume)
    if values.ndim != 3:
        raise ValueError(f"foreground_slices needs a (S0, S1, S2) volume, got shape {values.shape}.")
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    sample = values if finite.all() else values[finite]
    if sample.size == 0:
        return []
    low, high = np.percentile(sample, [1.0, 99.0])
    foreground = finite & (values > low + level * (high - low))
    axis = slice_axis % 3
    in_plane = tuple(a for a in range(3) if a != axis)
    shares = foreground.mean(axis=in_plane)
    return [int(k) for k in np.flatnonzero(shares >= share)]


def _is_volume_file(filename: Any) -> bool:
    """A NIfTI file whose header has a third axis of more than one slice and no fourth axis (or one of length 1);
    False for other files, 2D NIfTI, one-slice volumes, and 4D series (time, channels), which the loader decides on
    as before."""
    if not isinstance(filename, (str, os.PathLike)) or not os.fspath(filename).lower().endswith(VOLUME_SUFFIXES):
        return False
    try:
        size = header_size(os.fspath(filename))
    except BadImageError:
        return False  # the loader names the problem
    return size is not None and len(size) >= 3 and size[2] > 1 and all(s == 1 for s in size[3:])


def expand_volumes(
    items: Sequence[Mapping[str, Any]],
    slice_axis: int | None = -1,
    model_slice_index: int | None = None,
    image_key: str = "image",
) -> list[dict[str, Any]]:
    """Data items with each 3D NIfTI volume replaced by one item per slice to score.

    A volume's item ``{"image": path, ...}`` becomes ``{"image": path, ..., "slice_index": k, "slice_axis": a}`` for
    each slice ``k`` along axis ``a`` (non-negative) that :func:`foreground_slices` keeps, in ascending order and in
    the volume's place in the list; :class:`bundle.transforms.LoadGrayscaleImaged` then loads that slice. A volume
    without such a slice is left out with a warning. Every other item (2D images, one-slice volumes, DICOM, files
    that cannot be read: the loader names their problem) passes unchanged.

    Args:
        items: ``[{"image": path, ...}, ...]`` as :func:`bundle.data.list_images` makes them.
        slice_axis: the spatial axis (0, 1, 2 or -3..-1; -1 the last) to slice along; None returns ``items``
            unchanged (a volume is then refused by the loader, as before slice-by-slice scoring).
        model_slice_index: the model's ``slice_index`` (its settings): a model trained on one slice position of
            volumes scores that slice of each volume, as before, so ``items`` are returned unchanged.
        image_key: the key holding the file name.

    Raises:
        ValueError: ``slice_axis`` is not an axis of a 3D volume.
        DatalistError: ``items`` held images but nothing is left to score (every input a volume without foreground).
    """
    items = [dict(item) for item in items]
    if slice_axis is None:
        return items
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)) or not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be an axis of a 3D volume (0, 1, 2 or -3..-1), got {slice_axis!r}.")
    if model_slice_index is not None:
        if any(_is_volume_file(item.get(image_key)) for item in items):
            logger.info(
                f"the model scores slice {model_slice_index} of each volume (its slice_index): volumes are not "
                "scored slice by slice."
            )
        return items
    loader = make_loader()
    expanded: list[dict[str, Any]] = []
    for item in items:
        filename = item.get(image_key)
        if not _is_volume_file(filename):
            expanded.append(item)
            continue
        try:
            volume = read_volume(os.fspath(filename), loader)
        except BadImageError:
            expanded.append(item)  # the loader raises the same error, in the same place as for any other bad file
            continue
        if volume.ndim != 4:  # (C, S0, S1, S2) only
            expanded.append(item)
            continue
        axis = int(slice_axis) % 3
        slices = foreground_slices(volume.float().mean(dim=0), axis)
        depth = int(volume.shape[1 + axis])
        if not slices:
            logger.warning(
                f"{filename}: none of its {depth} slices along axis {axis} holds enough foreground (at least "
                f"{FOREGROUND_SHARE:.0%} of the pixels above the 1st percentile + {FOREGROUND_LEVEL:.0%} of the "
                "intensity range): not scored."
            )
            continue
        logger.info(f"{filename}: {len(slices)} of {depth} slices along axis {axis} hold foreground and are scored.")
        expanded.extend({**item, SLICE_INDEX_KEY: k, SLICE_AXIS_KEY: axis} for k in slices)
    if items and not expanded:
        raise DatalistError("no image to score: every input is a volume without a slice that holds foreground.")
    return expanded


def slice_row_name(filename: str, slice_index: int) -> str:
    """The file column of a slice's row in scores.csv: ``<file>#slice=<k>`` (k along the run's ``slice_axis``)."""
    return f"{filename}#slice={slice_index}"


def score_row_meta(batch: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[Mapping[str, Any]]:
    """``ClassificationSaver`` batch transform: the image metadata of each item of a decollated batch, whose
    ``filename_or_obj`` names the row of scores.csv; for a slice of a volume that name becomes
    :func:`slice_row_name` of the volume's file. Other items' metadata is returned as it is (today's rows)."""
    rows = []
    for item in batch:
        meta = DecodeMixedMetad(image_key)(item)[image_key].meta
        scored_slice = volume_slice(meta)
        if scored_slice is None:
            rows.append(meta)
        else:
            rows.append({"filename_or_obj": slice_row_name(str(meta["filename_or_obj"]), scored_slice[1])})
    return rows
