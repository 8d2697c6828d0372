# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Med-AD data sets: parsing ``data.json``, the three SAGAN training streams, and decode-once image caches (which
take 3D volumes slice by slice: :class:`ImageCache`)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.transforms import Randomizable, apply_transform
from monai.utils import MAX_SEED

from .transforms.io import SLICE_INDEX_KEY, VOLUME_LOCK, BadImageError, LoadGrayscaleImaged, dicom_series_under

if TYPE_CHECKING:
    from .volumes import VolumeSlices

__all__ = [
    "DatalistError",
    "MedADDatalist",
    "load_medad_datalist",
    "select_unlabeled",
    "image_items",
    "labelled_items",
    "list_images",
    "SkippedImageError",
    "ImageCache",
    "SAGANTrainingDataset",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz")
# about a million file names: a data.json above this is not a file list (and would take GBs to parse)
MAX_DATALIST_BYTES = 64 * 2**20


class DatalistError(ValueError):
    """A malformed or inconsistent data set description; the message names the file and the key."""


@dataclass
class MedADDatalist:
    """The file lists of one Med-AD data set, as absolute paths.

    ``val`` and ``test`` map a label (0 normal, 1 abnormal) to files; ``val`` is empty when data.json has none.
    """

    root: str
    normal: list[str]
    unlabeled_normal: list[str] = field(default_factory=list)
    unlabeled_abnormal: list[str] = field(default_factory=list)
    val: dict[int, list[str]] = field(default_factory=dict)
    test: dict[int, list[str]] = field(default_factory=dict)


def _file_list(value: object, where: str, json_path: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise DatalistError(f"{json_path}: key {where} must be a list of file names.")
    return value


def _labelled(split: object, name: str, json_path: str) -> dict[int, list[str]]:
    if not isinstance(split, dict) or not {"0", "1"} <= set(split):
        raise DatalistError(f"{json_path}: key '{name}' must hold the lists '0' (normal) and '1' (abnormal).")
    return {int(k): _file_list(split[k], f"'{name}/{k}'", json_path) for k in ("0", "1")}


def _check_names(lists: dict[str, list[str]], json_path: str) -> None:
    """Refuses a name that leaves ``images/``, a file listed twice in one list, and a file listed twice in ``val``
    and ``test`` (in both splits, or under both labels); warns about a file in training and in ``val`` / ``test``."""
    where: dict[str, str] = {}
    for key, files in lists.items():
        seen: set[str] = set()
        for name in files:
            if "\x00" in name:
                raise DatalistError(f"{json_path}: '{key}' lists {name!r}, a file name with a NUL character.")
            norm = os.path.normpath(name)
            if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
                raise DatalistError(
                    f"{json_path}: '{key}' lists {name!r}, which points outside images/; names in data.json are "
                    "file names relative to the images/ folder and must stay inside it."
                )
            if norm in seen:
                raise DatalistError(
                    f"{json_path}: '{key}' lists {name!r} more than once; each copy would be used (and, in val or "
                    "test, scored) again."
                )
            seen.add(norm)
            other = where.setdefault(norm, key)
            if other == key:
                continue
            if "train" in (key.split("/")[0], other.split("/")[0]):  # odd, or a leak: say so, it is not fatal
                leak = "" if key.startswith("train") else f"; the {key.split('/')[0]} metrics are optimistic"
                logger.warning(f"{json_path}: {name!r} is listed under both '{other}' and '{key}'{leak}.")
                continue
            raise DatalistError(
                f"{json_path}: {name!r} is listed under both '{other}' and '{key}'; an evaluated image belongs to one "
                "split and has one label (otherwise the metrics count it twice or with both labels)."
            )


def load_medad_datalist(dataset_dir: str, check_files: bool = True) -> MedADDatalist:
    """Parse ``dataset_dir/data.json`` (Med-AD layout, images in ``dataset_dir/images``).

    Required: ``train/0``; optional: ``train/unlabeled/{0,1}``, ``val/{0,1}``, ``test/{0,1}``. Names are relative
    to ``images/`` (symbolic links inside it may point anywhere). With ``check_files`` every referenced file must
    exist; all missing files are listed in one error.

    Raises:
        DatalistError: no data.json, one larger than ``MAX_DATALIST_BYTES``, invalid JSON, missing or malformed
            keys, an empty ``train/0``, a name outside ``images/``, a file listed twice in one list or twice in
            val and test, missing images.
    """
    json_path = os.path.join(dataset_dir, "data.json")
    if not os.path.isfile(json_path):
        raise DatalistError(f"{json_path}: not found; a Med-AD data set needs images/ and data.json.")
    size = os.path.getsize(json_path)
    if size > MAX_DATALIST_BYTES:
        raise DatalistError(
            f"{json_path}: {size / 2**20:.0f} MiB, more than the {MAX_DATALIST_BYTES / 2**20:.0f} MiB a list of about "
            "a million file names takes; is it the right file? (bundle.data.MAX_DATALIST_BYTES sets the limit)"
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DatalistError(f"{json_path}: not valid JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict) or "0" not in raw["train"]:
        raise DatalistError(f"{json_path}: key 'train/0' (the normal training images) is missing.")
    train = raw["train"]
    normal = _file_list(train["0"], "'train/0'", json_path)
    if not normal:
        raise DatalistError(f"{json_path}: key 'train/0' is empty.")
    unlabeled = train.get("unlabeled", {"0": [], "1": []})
    unl = _labelled(unlabeled, "train/unlabeled", json_path)
    val = _labelled(raw["val"], "val", json_path) if "val" in raw else {}
    test = _labelled(raw["test"], "test", json_path) if "test" in raw else {}
    lists = {"train/0": normal, "train/unlabeled/0": unl[0], "train/unlabeled/1": unl[1]}
    lists.update({f"val/{k}": v for k, v in val.items()})
    lists.update({f"test/{k}": v for k, v in test.items()})
    _check_names(lists, json_path)
    images = os.path.join(dataset_dir, "images")

    def absolute(files: list[str]) -> list[str]:
        return [os.path.join(images, f) for f in files]

    datalist = MedADDatalist(
        root=dataset_dir,
        normal=absolute(normal),
        unlabeled_normal=absolute(unl[0]),
        unlabeled_abnormal=absolute(unl[1]),
        val={k: absolute(v) for k, v in val.items()},
        test={k: absolute(v) for k, v in test.items()},
    )
    if check_files:
        every = datalist.normal + datalist.unlabeled_normal + datalist.unlabeled_abnormal
        every += [f for split in (datalist.val, datalist.test) for files in split.values() for f in files]
        missing = [f for f in dict.fromkeys(every) if not os.path.isfile(f)]
        if missing:
            shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise DatalistError(f"{json_path}: {len(missing)} listed image(s) not found:\n  {shown}")
    return datalist


def select_unlabeled(
    datalist: MedADDatalist, anomaly_ratio: float = 0.6, size: int | None = None, seed: int = 0, order: str = "random"
) -> list[str]:
    """The unlabeled training set T_u: ``floor(anomaly_ratio * size)`` files from ``unlabeled/1`` and the rest
    from ``unlabeled/0``. ``order="random"`` draws each without replacement with ``seed``; ``"first"`` takes the
    first files of each list in data.json order, as the published code does. ``size`` defaults to |T_n|; 0 gives
    the paper's "0_u" setting (no unlabeled data)."""
    if order not in ("random", "first"):
        raise DatalistError(f"unlabeled_selection must be 'random' or 'first', got {order!r}.")
    if not 0.0 <= anomaly_ratio <= 1.0:
        raise DatalistError(f"anomaly_ratio must be in [0, 1], got {anomaly_ratio}.")
    size = len(datalist.normal) if size is None else int(size)
    n_abnormal = math.floor(anomaly_ratio * size + 1e-9)
    n_normal = size - n_abnormal
    for n, pool, key in ((n_abnormal, datalist.unlabeled_abnormal, "1"), (n_normal, datalist.unlabeled_normal, "0")):
        if n > len(pool):
            raise DatalistError(
                f"{datalist.root}/data.json: 'train/unlabeled/{key}' has {len(pool)} images; {n} are needed for "
                f"{size} unlabeled images at anomaly ratio {anomaly_ratio}."
            )
    if order == "first":
        return datalist.unlabeled_normal[:n_normal] + datalist.unlabeled_abnormal[:n_abnormal]
    rng = np.random.default_rng(seed)
    abnormal = [
        datalist.unlabeled_abnormal[i]
        for i in sorted(rng.choice(len(datalist.unlabeled_abnormal), n_abnormal, replace=False))
    ]
    normal = [
        datalist.unlabeled_normal[i]
        for i in sorted(rng.choice(len(datalist.unlabeled_normal), n_normal, replace=False))
    ]
    return normal + abnormal


def image_items(files: Sequence[str]) -> list[dict]:
    """``[{"image": file}, ...]``: the item form that ``ImageCache`` and MONAI datasets take."""
    return [{"image": f} for f in files]


def labelled_items(datalist: MedADDatalist, split: str) -> list[dict]:
    """``[{"image": path, "label": 0 or 1, "filename": path}, ...]`` of ``val`` or ``test``.

    Raises:
        DatalistError: the split is absent or one of its classes is empty (AUC and AP need both)."""
    files = getattr(datalist, split)
    if not files:
        raise DatalistError(f"{datalist.root}/data.json: no '{split}' split; it is needed for AUC and AP.")
    for label in (0, 1):
        if not files[label]:
            raise DatalistError(
                f"{datalist.root}/data.json: '{split}/{label}' is empty; AUC and AP need normal and abnormal images."
            )
    return [{"image": f, "label": label, "filename": f} for label in (0, 1) for f in files[label]]


def list_images(path: str | Sequence[str]) -> list[dict]:
    """Inference inputs ``[{"image": file}, ...]`` from a folder (every supported image in it, sorted), a file,
    or a list of files.

    A DICOM series in the folder or in a folder below it (several single-frame instances of one series with position
    and orientation, CT or MR: :func:`bundle.transforms.io.find_dicom_series`) is one item ``{"image": folder}``
    (after the folder's other files, series in the order of their folders), which :mod:`bundle.volumes` scores
    slice by slice as a volume; its instances are not listed as files. DICOM files of one-instance series
    (radiographs) are listed as before.

    Raises:
        DatalistError: nothing to score, or a folder holding two or more DICOM series of several slices (named).
    """
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
        )
        try:
            series = dicom_series_under(path)
        except BadImageError as e:
            raise DatalistError(str(e)) from e
        if series:
            in_series = {f for s in series for f in s.files}
            files = [f for f in files if os.path.normpath(f) not in in_series]
            return image_items(files) + [{"image": s.folder} for s in series]
        if not files:
            raise DatalistError(f"{path}: no images with a supported suffix {IMAGE_SUFFIXES}.")
    elif os.path.isfile(path):
        files = [os.fspath(path)]
    else:
        raise DatalistError(f"{path}: no such file or folder.")
    return image_items(files)


def _is_nifti(filename: object) -> bool:
    return isinstance(filename, (str, os.PathLike)) and os.fspath(filename).lower().endswith((".nii", ".nii.gz"))


def _image_loaders(transform: object) -> list[LoadGrayscaleImaged]:
    """The :class:`LoadGrayscaleImaged` transforms inside ``transform`` (a ``Compose``, nested or not)."""
    if isinstance(transform, LoadGrayscaleImaged):
        return [transform]
    return [t for inner in getattr(transform, "transforms", ()) or () for t in _image_loaders(inner)]


class _EmptyVolumeError(BadImageError):
    """A volume without a slice that holds foreground: left out of an :class:`ImageCache` with a warning, whatever
    ``on_bad_image`` says (it is readable, and a long run should not stop for it)."""


class SkippedImageError(BadImageError):
    """A bad image that ``on_bad_image="skip"`` leaves out: raised by an uncached :class:`ImageCache` for an image
    that became unreadable after start-up, so that the caller drops it (an evaluation batch) or draws another item
    (the training pairs) instead of getting a neighbour in its place."""


class ImageCache(torch.utils.data.Dataset):
    """Items ``{"image": path, ...}`` whose image is decoded by the deterministic ``transform``.

    With ``cache=True`` (default) every image is decoded once at construction, in threads, and kept; ``cache=False``
    decodes at each access (for data sets too large for memory).

    **Volumes**: an item whose ``image`` is a 3D NIfTI volume becomes the items of its foreground slices along
    ``slice_axis`` (:func:`bundle.volumes.slice_items`: the rule inference uses), in the volume's place; each copies
    the volume's keys (its ``label``), its ``filename`` (labelled sets) becomes ``<file>#slice=<k>``, and the
    transform's :class:`~bundle.transforms.LoadGrayscaleImaged` loads that slice ((1, H, W) as for a 2D image). A
    volume is read once: its slices are decoded right after (one volume at a time, so that only one full volume is
    held besides the cached slices; without ``cache`` a slice read out of order decodes its volume again). A volume
    without a foreground slice is left out with a warning and recorded in :attr:`skipped`; a 4D series is a bad
    image. :attr:`volumes` maps each volume's file to its :class:`bundle.volumes.VolumeSlices` and
    :attr:`slice_rows` each slice item's ``filename`` (labelled items) to ``(volume file, slice index)``; both are
    empty without volumes, whose items are taken exactly as before. Not sliced: ``slice_axis=None``, or a transform
    whose loader has a fixed ``slice_index`` (the model's slice of each volume).

    A bad image raises :class:`BadImageError` naming it. With ``on_bad_image="skip"`` a bad image is left out, never
    replaced by another one, logged, and recorded once in :attr:`skipped` (``{**item, "file", "reason"}``):

    - at construction the images are checked (always when cached; uncached with ``validate``, the default: each image
      is decoded once and thrown away), and the bad ones are dropped, so that the length counts good images only;
    - an uncached image that goes bad later raises :class:`SkippedImageError` from ``__getitem__`` (the training
      pairs then draw another pair) and is left out of its batch by ``__getitems__`` (what a DataLoader calls), so
      that an evaluation scores each listed image at most once; ``EvaluationReportHandler`` reports the images it
      did not score.

    Args:
        items: ``{"image": path, ...}`` dicts (``filename`` and ``label`` are kept for labelled sets).
        transform: the deterministic preprocessing, item -> item.
        cache: decode once at construction and keep the results.
        on_bad_image: "error" (raise) or "skip".
        num_workers: threads that decode at construction (default: up to 8).
        name: what the images are, for messages.
        validate: uncached and skipping: decode every image once at construction to drop the bad ones.
        slice_axis: the axis (0, 1, 2 or -3..-1; -1 the last) along which a 3D NIfTI volume among ``items`` is
            taken slice by slice; None: volumes are refused by the loader (or read at the ``slice_index`` of the
            transform's loader), as before.
    """

    def __init__(
        self,
        items: Sequence[dict],
        transform: Callable,
        cache: bool = True,
        on_bad_image: str = "error",
        num_workers: int | None = None,
        name: str = "images",
        validate: bool = True,
        slice_axis: int | None = -1,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.name = name
        self.items = list(items)
        self.skipped: list[dict] = []
        self._skipped_files: set[str] = set()
        self._cached: list[dict] | None = None
        self.volumes: dict[str, VolumeSlices] = {}
        self.slice_rows: dict[str, tuple[str, int]] = {}
        slice_axis = self._volume_slice_axis(transform, slice_axis)
        decode = cache or (validate and on_bad_image == "skip")
        if slice_axis is not None:
            self._init_with_volumes(slice_axis, cache, decode, num_workers)
            return
        if not decode or not self.items:  # no items: the "0_u" setting
            self._cached = [] if cache else None
            return
        start = time.perf_counter()
        with ThreadPoolExecutor(num_workers or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(lambda item: self._try(item, keep=cache), self.items))
        kept = []
        for item, result in zip(self.items, results):
            if isinstance(result, BadImageError):
                self._skip(item, result, log=True)
            else:
                kept.append((item, result))
        if not kept:
            raise BadImageError(name, f"no readable image left ({len(self.skipped)} bad ones skipped)")
        self.items = [item for item, _ in kept]
        self._cached = [r for _, r in kept] if cache else None
        skipped = f", {len(self.skipped)} bad ones skipped" if self.skipped else ""
        what = "decoded" if cache else "checked"
        logger.info(f"{what} {len(self.items)} {name} in {time.perf_counter() - start:.1f} s{skipped}")

    def _volume_slice_axis(self, transform: Callable, slice_axis: int | None) -> int | None:
        """The axis to expand volumes along, or None when the items are taken as they are: no volume among them,
        ``slice_axis`` None, or a ``transform`` that does not load slice items (no
        :class:`~bundle.transforms.LoadGrayscaleImaged`, or one with the model's fixed ``slice_index``)."""
        from .volumes import check_slice_axis

        if slice_axis is None:
            return None
        axis = check_slice_axis(slice_axis)
        if not any(_is_nifti(item.get("image")) for item in self.items):  # data.json lists files, no series
            return None
        loaders = _image_loaders(transform)
        if not loaders:
            logger.warning(f"{self.name}: the preprocessing has no LoadGrayscaleImaged; volumes are not sliced.")
            return None
        fixed = {t.slice_index for t in loaders} - {None}
        if fixed:
            logger.info(
                f"{self.name}: slice {fixed.pop()} of each volume is used (slice_index): volumes are not taken slice "
                "by slice."
            )
            return None
        return axis

    def _init_with_volumes(self, slice_axis: int, cache: bool, decode: bool, num_workers: int | None) -> None:
        """Construction when some items are 3D volumes: each volume becomes the items of its foreground slices
        (:func:`bundle.volumes.slice_items`) and, when ``decode``, they are decoded right after their volume is
        read, so that a volume is decoded once and only one full volume is held at a time (the decoded slices are
        kept when ``cache``). A volume without a foreground slice is left out with a warning and recorded in
        :attr:`skipped`."""
        from .transforms.io import make_loader

        start = time.perf_counter()
        loader = make_loader()
        if not cache:
            logger.warning(
                f"{self.name}: volumes without cache_images: every slice read out of order (training) decodes its "
                "whole volume again; set cache_images true for volume data sets that fit in memory as slices."
            )
        with ThreadPoolExecutor(num_workers or min(8, os.cpu_count() or 1)) as pool:
            groups = list(pool.map(lambda item: self._load_group(item, slice_axis, loader, cache, decode), self.items))
        kept = []
        for item, group in zip(self.items, groups):
            if isinstance(group, BadImageError):
                self._skip(item, group, log=not isinstance(group, _EmptyVolumeError))  # that one is logged
                continue
            for sliced, result in group:
                if isinstance(result, BadImageError):
                    self._skip(sliced, result, log=True)
                else:
                    kept.append((sliced, result))
        if not kept:
            raise BadImageError(self.name, f"no readable image left ({len(self.skipped)} bad ones or volumes skipped)")
        self.items = [item for item, _ in kept]
        self._cached = [r for _, r in kept] if cache else None  # caching always decodes
        for item in self.items:
            if SLICE_INDEX_KEY in item and "filename" in item:  # labelled items: the rows of an evaluation
                self.slice_rows[str(item["filename"])] = (str(item["image"]), int(item[SLICE_INDEX_KEY]))
        n_slices = sum(len(v.slices) for v in self.volumes.values())
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        what = "decoded" if decode and cache else ("checked" if decode else "listed")
        logger.info(
            f"{what} {len(self.items)} {self.name} ({n_slices} foreground slices of {len(self.volumes)} volumes along "
            f"axis {slice_axis}) in {time.perf_counter() - start:.1f} s{skipped}"
        )

    def _load_group(
        self, item: dict, slice_axis: int, loader: Callable, keep: bool, decode: bool
    ) -> list[tuple[dict, dict | bool | BadImageError]] | BadImageError:
        """One listed item as ``[(item, result), ...]``: a volume's slice items (read and decoded one volume at a
        time: :func:`bundle.transforms.io.read_volume` keeps one volume per process), or the item itself; ``result``
        as :meth:`_try` gives it (True without ``decode``). A volume without a foreground slice, or a 4D series,
        gives a :class:`BadImageError` (a 4D series raises it when bad images are errors)."""
        if _is_nifti(item.get("image")):
            with VOLUME_LOCK:  # its slices are decoded while it is the kept volume
                group = self._load_volume(item, slice_axis, loader, keep, decode)
            if group is not None:
                return group
        return [(item, self._try(item, keep=keep) if decode else True)]  # not a volume: as before, outside the lock

    def _load_volume(
        self, item: dict, slice_axis: int, loader: Callable, keep: bool, decode: bool
    ) -> list[tuple[dict, dict | bool | BadImageError]] | BadImageError | None:
        """:meth:`_load_group` of a NIfTI item, None when it is not a 3D volume; called under the volume lock."""
        from .volumes import slice_items

        try:
            found = slice_items(item, slice_axis, loader)
        except BadImageError as e:  # a 4D series
            if self.on_bad_image == "error":
                raise
            return e
        if found is None:
            return None
        sliced, info = found
        if not sliced:
            logger.warning(f"{info.filename}: {info.no_foreground_reason()}: left out of the {self.name}.")
            return _EmptyVolumeError(info.filename, info.no_foreground_reason())
        if item.get("mask"):
            logger.warning(
                f"{info.filename}: lesion masks of volumes are not read yet; its slices are scored without one."
            )
            sliced = [{**s, "mask": ""} for s in sliced]
        self.volumes[info.filename] = info
        return [(s, self._try(s, keep=keep) if decode else True) for s in sliced]

    def _decode(self, item: dict) -> dict:
        try:
            return apply_transform(self.transform, dict(item))
        except Exception as e:  # MONAI wraps transform errors: surface the bad-image message, or name the file
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, BadImageError):
                cause = cause.__cause__
            if cause is None:
                root = e.__cause__ or e
                cause = BadImageError(str(item.get("image")), f"preprocessing failed ({type(root).__name__}: {root})")
            raise cause from e

    def _try(self, item: dict, keep: bool) -> dict | bool | BadImageError:
        """The decoded item (``keep``) or True; the error of a bad image when skipping."""
        try:
            result = self._decode(item)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            return e
        return result if keep else True

    def _skip(self, item: dict, error: BadImageError, log: bool) -> None:
        file = str(item.get("filename", item.get("image")))
        if file in self._skipped_files:
            return
        self._skipped_files.add(file)
        self.skipped.append({**item, "file": file, "reason": error.problem})
        if log:
            logger.warning(f"skipping bad image {error} ({len(self.skipped)} {self.name} skipped so far)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if self._cached is not None:
            return dict(self._cached[index])
        item = self.items[index]
        result = self._try(item, keep=True)
        if isinstance(result, BadImageError):
            self._skip(item, result, log=False)  # the caller decides what to do and logs it
            raise SkippedImageError(result.filename, result.problem) from result
        return result

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """The items of one DataLoader batch, without the skipped ones (see the class docstring).

        Raises:
            BadImageError: every image of the batch went bad during the run (an empty batch cannot be scored)."""
        out, lost = [], []
        for i in indices:
            try:
                out.append(self[i])
            except SkippedImageError as e:
                logger.warning(f"skipping bad image {e}: it is left out of this batch and of the results")
                lost.append(e.filename)
        if not out:
            raise BadImageError(
                self.name, f"all {len(lost)} images of a batch became unreadable during the run: {', '.join(lost)}"
            )
        return out


class SAGANTrainingDataset(Randomizable, torch.utils.data.Dataset):
    """The three SAGAN training streams as one item per pair.

    Item ``i`` holds ``normal`` = T_n[i], ``unlabeled`` = T_u[i] (absent in the "0_u" setting), ``donor`` = a
    random other image of T_n, and whatever ``pair_transform`` adds (the FPI pseudo anomaly ``pseudo``). Images are
    (1, H, W) tensors in [-1, 1]. Pairs are fixed by index as in the authors' code; the loader shuffles them.
    """

    MAX_REDRAWS = 100

    def __init__(self, normal: ImageCache, unlabeled: ImageCache | None, pair_transform: Callable | None = None):
        if len(normal) < 2:
            raise DatalistError("the normal training set needs at least 2 images (FPI takes a donor from it).")
        self.normal = normal
        self.unlabeled = unlabeled if unlabeled is not None and len(unlabeled) > 0 else None
        self.pair_transform = pair_transform
        self.n_skipped = 0

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seeds the donor draw and, from it, the pair transform (MONAI's DataLoader calls this per worker)."""
        super().set_random_state(seed, state)
        if isinstance(self.pair_transform, Randomizable):
            self.pair_transform.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def __len__(self) -> int:
        return max(len(self.normal), len(self.unlabeled) if self.unlabeled is not None else 0)

    def __getitem__(self, index: int) -> dict:
        """Pair ``index``; when an image of it went bad during the run (an uncached set skipping bad images),
        another pair drawn at random, logged and counted in :attr:`n_skipped`.

        Raises:
            BadImageError: ``MAX_REDRAWS`` draws in a row hit bad images."""
        for _ in range(self.MAX_REDRAWS):
            try:
                return self._pair(index)
            except SkippedImageError as e:
                self.n_skipped += 1
                logger.warning(
                    f"skipping bad image {e}; pair {index} replaced by a random pair ({self.n_skipped} skipped in "
                    "this process so far)"
                )
                index = int(self.R.randint(len(self)))
        raise BadImageError("training images", f"{self.MAX_REDRAWS} draws in a row hit bad images")

    def _pair(self, index: int) -> dict:
        n = len(self.normal)
        i = index % n
        j = (i + 1 + int(self.R.randint(0, n - 1))) % n  # uniform over the other n - 1 normal images
        item = {"normal": self.normal[i]["image"], "donor": self.normal[j]["image"]}
        if self.unlabeled is not None:
            item["unlabeled"] = self.unlabeled[index % len(self.unlabeled)]["image"]
        return apply_transform(self.pair_transform, item) if self.pair_transform is not None else item


def display_batch(dataset: ImageCache, per_class: int = 4) -> torch.Tensor:
    """The first ``per_class`` normal and abnormal images of a labelled cache as (K, 1, H, W), for image grids."""
    picked: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i in range(len(dataset)):  # one pass, stopping early: an uncached set decodes only what it needs
        try:
            item = dataset[i]
        except SkippedImageError:
            continue
        label = int(item["label"])
        if len(picked[label]) < per_class:
            picked[label].append(torch.as_tensor(item["image"]).as_subclass(torch.Tensor))
        if all(len(v) == per_class for v in picked.values()):
            break
    return torch.stack(picked[0] + picked[1])


def load_masks(datalist: MedADDatalist) -> dict[str, str]:
    """Lesion masks from the optional ``"masks"`` entry of ``data.json``, as absolute paths ``{image: mask}``.

    ``"masks": {"<image file>": "<mask file>", ...}``: keys are image names exactly as listed in the splits
    (relative to ``images/``), values are mask files relative to the data set folder (e.g. ``masks/<name>.png``).
    A mask has the image's size and format family (it is read by the same reader); non-zero pixels are lesion.
    Images without an entry have no mask. Returns ``{}`` when data.json has no ``"masks"``.

    Raises:
        DatalistError: ``"masks"`` is not a mapping of file names, names an image that data.json does not list,
            or lists mask files that do not exist (all missing files in one message).
    """
    json_path = os.path.join(datalist.root, "data.json")
    with open(json_path) as f:
        raw = json.load(f)
    entry = raw.get("masks") if isinstance(raw, dict) else None
    if entry is None:
        return {}
    valid = isinstance(entry, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in entry.items())
    if not valid:
        raise DatalistError(f"{json_path}: key 'masks' must map image file names to mask file names.")
    images = os.path.join(datalist.root, "images")
    listed = set(datalist.normal + datalist.unlabeled_normal + datalist.unlabeled_abnormal)
    listed.update(f for split in (datalist.val, datalist.test) for files in split.values() for f in files)
    unknown = [k for k in entry if os.path.join(images, k) not in listed]
    if unknown:
        raise DatalistError(
            f"{json_path}: 'masks' names {len(unknown)} image(s) that no split lists (keys are image names as in "
            f"the splits, relative to images/): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    masks = {os.path.join(images, k): os.path.join(datalist.root, v) for k, v in entry.items()}
    missing = [m for m in dict.fromkeys(masks.values()) if not os.path.isfile(m)]
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DatalistError(
            f"{json_path}: {len(missing)} mask file(s) listed under 'masks' not found (paths are relative to the "
            f"data set folder):\n  {shown}"
        )
    return masks


def with_masks(items: Sequence[dict], masks: dict[str, str]) -> list[dict]:
    """``items`` with a ``"mask"`` entry each: the image's mask file from :func:`load_masks`, or ``""`` (none).

    Every item gets the key so that a batch collates; :class:`bundle.localisation.LoadLesionMaskd` turns it into
    a mask and a ``has_mask`` flag."""
    return [{**item, "mask": masks.get(item["image"], "")} for item in items]
