# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Med-AD data sets: parsing ``data.json``, the three SAGAN training streams, and decode-once image caches."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import Randomizable, apply_transform
from monai.utils import MAX_SEED

from .transforms.io import BadImageError

__all__ = [
    "DatalistError",
    "MedADDatalist",
    "load_medad_datalist",
    "select_unlabeled",
    "image_items",
    "labelled_items",
    "list_images",
    "ImageCache",
    "SAGANTrainingDataset",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz")


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


def load_medad_datalist(dataset_dir: str, check_files: bool = True) -> MedADDatalist:
    """Parse ``dataset_dir/data.json`` (Med-AD layout, images in ``dataset_dir/images``).

    Required: ``train/0``; optional: ``train/unlabeled/{0,1}``, ``val/{0,1}``, ``test/{0,1}``.
    With ``check_files`` every referenced file must exist; all missing files are listed in one error.

    Raises:
        DatalistError: no data.json, invalid JSON, missing or malformed keys, an empty ``train/0``, missing images.
    """
    json_path = os.path.join(dataset_dir, "data.json")
    if not os.path.isfile(json_path):
        raise DatalistError(f"{json_path}: not found; a Med-AD data set needs images/ and data.json.")
    try:
        with open(json_path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatalistError(f"{json_path}: not valid JSON ({e}).") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("train"), dict) or "0" not in raw["train"]:
        raise DatalistError(f"{json_path}: key 'train/0' (the normal training images) is missing.")
    train = raw["train"]
    normal = _file_list(train["0"], "'train/0'", json_path)
    if not normal:
        raise DatalistError(f"{json_path}: key 'train/0' is empty.")
    unlabeled = train.get("unlabeled", {"0": [], "1": []})
    unl = _labelled(unlabeled, "train/unlabeled", json_path)
    images = os.path.join(dataset_dir, "images")

    def absolute(files: list[str]) -> list[str]:
        return [os.path.join(images, f) for f in files]

    datalist = MedADDatalist(
        root=dataset_dir,
        normal=absolute(normal),
        unlabeled_normal=absolute(unl[0]),
        unlabeled_abnormal=absolute(unl[1]),
        val={k: absolute(v) for k, v in _labelled(raw["val"], "val", json_path).items()} if "val" in raw else {},
        test={k: absolute(v) for k, v in _labelled(raw["test"], "test", json_path).items()} if "test" in raw else {},
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
    datalist: MedADDatalist,
    anomaly_ratio: float = 0.6,
    size: int | None = None,
    seed: int = 0,
    order: str = "random",
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
    or a list of files."""
    if isinstance(path, (list, tuple)):
        files = [os.fspath(p) for p in path]
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")
        )
        if not files:
            raise DatalistError(f"{path}: no images with a supported suffix {IMAGE_SUFFIXES}.")
    elif os.path.isfile(path):
        files = [os.fspath(path)]
    else:
        raise DatalistError(f"{path}: no such file or folder.")
    return image_items(files)


class ImageCache(torch.utils.data.Dataset):
    """Items ``{"image": path, ...}`` whose image is decoded once by the deterministic ``transform``.

    With ``cache=True`` (default) every image is decoded at construction, in threads, so that a bad file is found
    at start-up; ``cache=False`` decodes at each access (for data sets too large for memory; that the files exist
    is checked at start-up by :func:`load_medad_datalist`). A bad image raises :class:`BadImageError` naming it,
    or with ``on_bad_image="skip"`` is dropped (cached) or replaced by the next good item (uncached) with a logged
    warning.
    """

    def __init__(
        self,
        items: Sequence[dict],
        transform: Callable,
        cache: bool = True,
        on_bad_image: str = "error",
        num_workers: int | None = None,
        name: str = "images",
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}.")
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.items = list(items)
        self._cached: list[dict] | None = None
        if not cache or not self.items:  # no items: the paper's "0_u" setting has no unlabeled images
            self._cached = [] if cache else None
            return
        start = time.perf_counter()
        with ThreadPoolExecutor(num_workers or min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(self._decode_or_none, self.items))
        kept = [(item, r) for item, r in zip(self.items, results) if r is not None]
        if not kept:
            raise BadImageError(name, "no readable image left")
        self.items = [item for item, _ in kept]
        self._cached = [r for _, r in kept]
        logger.info(f"decoded {len(self._cached)} {name} in {time.perf_counter() - start:.1f} s")

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

    def _decode_or_none(self, item: dict) -> dict | None:
        try:
            return self._decode(item)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            logger.warning(f"skipping bad image {e}")
            return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        if self._cached is not None:
            return dict(self._cached[index])
        for offset in range(len(self.items)):
            result = self._decode_or_none(self.items[(index + offset) % len(self.items)])
            if result is not None:
                return result
        raise BadImageError("data set", "no readable image left")


class SAGANTrainingDataset(Randomizable, torch.utils.data.Dataset):
    """The three SAGAN training streams as one item per pair.

    Item ``i`` holds ``normal`` = T_n[i], ``unlabeled`` = T_u[i] (absent in the "0_u" setting), ``donor`` = a
    random other image of T_n, and whatever ``pair_transform`` adds (the FPI pseudo anomaly ``pseudo``). Images are
    (1, H, W) tensors in [-1, 1]. Pairs are fixed by index as in the authors' code; the loader shuffles them.
    """

    def __init__(self, normal: ImageCache, unlabeled: ImageCache | None, pair_transform: Callable | None = None):
        if len(normal) < 2:
            raise DatalistError("the normal training set needs at least 2 images (FPI takes a donor from it).")
        self.normal = normal
        self.unlabeled = unlabeled if unlabeled is not None and len(unlabeled) > 0 else None
        self.pair_transform = pair_transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seeds the donor draw and, from it, the pair transform (MONAI's DataLoader calls this per worker)."""
        super().set_random_state(seed, state)
        if isinstance(self.pair_transform, Randomizable):
            self.pair_transform.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def __len__(self) -> int:
        return max(len(self.normal), len(self.unlabeled) if self.unlabeled is not None else 0)

    def __getitem__(self, index: int) -> dict:
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
        item = dataset[i]
        label = int(item["label"])
        if len(picked[label]) < per_class:
            picked[label].append(torch.as_tensor(item["image"]).as_subclass(torch.Tensor))
        if all(len(v) == per_class for v in picked.values()):
            break
    return torch.stack(picked[0] + picked[1])
