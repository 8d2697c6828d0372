# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Scoring 3D volumes slice by slice: which slices of a volume are used, the data items that ask the image loader for
them, and how their rows are named in scores.csv.

Training and evaluation take volumes the same way: :class:`bundle.data.ImageCache` replaces a volume listed in
data.json by its foreground slices (:func:`slice_items`), each with the volume's label; the lists of data.json stay
lists of volumes, so the T_u draw, the pseudo-AUC hold-out and the splits are by volume and a volume's slices are
never in two of them. ``EvaluationReportHandler`` adds the volume level (the top slice score per volume) to the
slice-level metrics.

SAGAN is a 2D method. A 3D NIfTI volume given to ``run inferring`` becomes one data item per slice along
``slice_axis`` that holds enough foreground (:func:`foreground_slices`); each is loaded, scored and thresholded as a
2D image (:func:`bundle.transforms.io.load_grayscale_slice`: min-max scaled over the slice, as a 2D image is), gets a
row ``<file>#slice=<k>`` in scores.csv (:func:`score_row_meta`), and
:class:`bundle.handlers.VolumeAggregator` gathers the slices of each volume into volumes.csv and 3D NIfTI heat and
label maps in the volume's geometry.

A folder holding a DICOM series (several single-frame CT/MR instances of one SeriesInstanceUID, with position and
orientation: :func:`bundle.transforms.io.find_dicom_series`), given as input or found below it
(:func:`bundle.data.list_images`), is one volume the same way: its item's ``image`` is the folder, its instances are
stacked in the order of their position along the slice normal (slice k is the k-th position, whatever the file
names or InstanceNumbers), its affine comes from ImagePositionPatient, ImageOrientationPatient and PixelSpacing, and
its rows are ``<folder>#slice=<k>``; with ``--output_format dicom`` the aggregator writes one DICOM SEG and one SR for
the series. A folder with two or more such series is refused, naming it (one series per folder).

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import DatalistError
from .transforms.io import (
    SLICE_AXIS_KEY,
    SLICE_INDEX_KEY,
    BadImageError,
    find_dicom_series,
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
    "VolumeSlices",
    "check_slice_axis",
    "expand_volumes",
    "foreground_slices",
    "score_row_meta",
    "slice_items",
    "slice_row_name",
]

logger = logging.getLogger(__name__)

FOREGROUND_LEVEL = 0.05  # share of the volume's robust intensity range (1st..99th percentile) above its 1st percentile
FOREGROUND_SHARE = 0.05  # share of a slice's pixels that must be foreground for the slice to be scored
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # files scored slice by slice (and DICOM series folders; multi-frame: not yet)


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
    """A NIfTI file whose header has a third axis of more than one slice and no fourth axis (or one of length 1), or
    a folder holding a DICOM series read as a volume (:func:`bundle.transforms.io.find_dicom_series`); False for
    other files, 2D NIfTI, one-slice volumes, and 4D series (time, channels), which the loader decides on as
    before."""
    if isinstance(filename, (str, os.PathLike)) and os.path.isdir(filename):
        return find_dicom_series(os.fspath(filename)) is not None
    if not isinstance(filename, (str, os.PathLike)) or not os.fspath(filename).lower().endswith(VOLUME_SUFFIXES):
        return False
    try:
        size = header_size(os.fspath(filename))
    except BadImageError:
        return False  # the loader names the problem
    return size is not None and len(size) >= 3 and size[2] > 1 and all(s == 1 for s in size[3:])


@dataclass(frozen=True)
class VolumeSlices:
    """Which slices of one volume become data items.

    Attributes:
        filename: the volume's file (the item's ``image``).
        spatial_shape: (S0, S1, S2) of the volume.
        slice_axis: the axis the slices are taken along (0, 1 or 2).
        slices: the indices along ``slice_axis`` (ascending) that :func:`foreground_slices` keeps; empty when no
            slice holds foreground.
    """

    filename: str
    spatial_shape: tuple[int, int, int]
    slice_axis: int
    slices: tuple[int, ...]

    @property
    def depth(self) -> int:
        """The number of slices along ``slice_axis``."""
        return self.spatial_shape[self.slice_axis]

    def no_foreground_reason(self) -> str:
        """Why the volume gives no slice item, for messages that name its file."""
        return (
            f"none of its {self.depth} slices along axis {self.slice_axis} holds enough foreground (at least "
            f"{FOREGROUND_SHARE:.0%} of the pixels above the 1st percentile + {FOREGROUND_LEVEL:.0%} of the intensity "
            "range)"
        )


def check_slice_axis(slice_axis: Any) -> int:
    """``slice_axis`` (0, 1, 2 or -3..-1) as a non-negative axis of a 3D volume.

    Raises:
        ValueError: not an axis of a 3D volume."""
    if isinstance(slice_axis, bool) or not isinstance(slice_axis, (int, np.integer)) or not -3 <= slice_axis < 3:
        raise ValueError(f"slice_axis must be an axis of a 3D volume (0, 1, 2 or -3..-1), got {slice_axis!r}.")
    return int(slice_axis) % 3


def slice_items(
    item: Mapping[str, Any], slice_axis: int = -1, loader: Any = None, image_key: str = "image"
) -> tuple[list[dict[str, Any]], VolumeSlices] | None:
    """The slice items of one data item when it is a 3D NIfTI volume; None for anything else.

    A volume's item ``{"image": path, ...}`` gives ``{"image": path, ..., "slice_index": k, "slice_axis": a}`` for
    each slice ``k`` along axis ``a`` (non-negative) that :func:`foreground_slices` keeps, in ascending order; every
    other key is copied (a ``label`` is the volume's), except that a ``filename`` (the row name of labelled items)
    becomes :func:`slice_row_name` of it, so that each slice has its own row. The volume is read through
    :func:`bundle.transforms.io.read_volume`, which keeps it decoded for the slices loaded right after.

    Args:
        item: a data item, ``{"image": path, ...}``.
        slice_axis: the spatial axis to slice along (0, 1, 2 or -3..-1; -1 the last).
        loader: the ``LoadImage`` to read with (default: :func:`bundle.transforms.io.make_loader`).
        image_key: the key holding the file name.

    Returns:
        None when the item is not a 3D NIfTI volume or DICOM series folder (2D images, one-slice volumes, DICOM files)
        or its file cannot be read
        (the image loader names the problem); otherwise the slice items (empty when no slice holds foreground) and
        the volume's :class:`VolumeSlices`.

    Raises:
        ValueError: ``slice_axis`` is not an axis of a 3D volume.
        BadImageError: a 4D NIfTI series (time or channels along its fourth axis), which has no single slice to take.
    """
    axis = check_slice_axis(slice_axis)
    filename = item.get(image_key)
    if _is_series_file(filename):
        size = header_size(os.fspath(filename))
        raise BadImageError(
            os.fspath(filename),
            f"is a 4D series of shape {size} (time or channels along the fourth axis); SAGAN takes 2D images and "
            "the slices of 3D volumes: split it into 3D volumes first",
        )
    if not _is_volume_file(filename):
        return None
    try:
        volume = read_volume(os.fspath(filename), loader or make_loader())
    except BadImageError:
        return None  # the loader raises the same error, in the same place as for any other bad file
    if volume.ndim != 4:  # (C, S0, S1, S2) only
        return None
    shape = tuple(int(s) for s in volume.shape[1:])
    info = VolumeSlices(os.fspath(filename), shape, axis, tuple(foreground_slices(volume.float().mean(dim=0), axis)))
    items = []
    for k in info.slices:
        sliced = {**item, SLICE_INDEX_KEY: k, SLICE_AXIS_KEY: axis}
        if "filename" in item:
            sliced["filename"] = slice_row_name(str(item["filename"]), k)
        items.append(sliced)
    return items, info


def _is_series_file(filename: Any) -> bool:
    """A NIfTI file whose header has a fourth axis longer than one (a time series or channels)."""
    if not isinstance(filename, (str, os.PathLike)) or not os.fspath(filename).lower().endswith(VOLUME_SUFFIXES):
        return False
    try:
        size = header_size(os.fspath(filename))
    except BadImageError:
        return False
    return size is not None and len(size) >= 4 and any(s > 1 for s in size[3:])


def expand_volumes(
    items: Sequence[Mapping[str, Any]],
    slice_axis: int | None = -1,
    model_slice_index: int | None = None,
    image_key: str = "image",
) -> list[dict[str, Any]]:
    """Data items with each 3D NIfTI volume replaced by one item per slice to score (inference).

    A volume's item ``{"image": path, ...}`` becomes ``{"image": path, ..., "slice_index": k, "slice_axis": a}`` for
    each slice ``k`` along axis ``a`` (non-negative) that :func:`foreground_slices` keeps, in ascending order and in
    the volume's place in the list (:func:`slice_items`); :class:`bundle.transforms.LoadGrayscaleImaged` then loads
    that slice. A volume without such a slice is left out with a warning. Every other item (2D images, one-slice
    volumes, 4D series, DICOM, files that cannot be read: the loader names their problem) passes unchanged.

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
    axis = check_slice_axis(slice_axis)
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
        try:
            found = slice_items(item, axis, loader, image_key)
        except BadImageError:
            found = None  # a 4D series: the loader refuses it, as before
        if found is None:
            expanded.append(item)
            continue
        sliced, info = found
        if not sliced:
            logger.warning(f"{info.filename}: {info.no_foreground_reason()}: not scored.")
            continue
        logger.info(
            f"{info.filename}: {len(sliced)} of {info.depth} slices along axis {axis} hold foreground and are scored."
        )
        expanded.extend(sliced)
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
