# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""A synthetic, deterministic demo data set in the Med-AD layout: "anatomy" with one shared layout (body, lungs,
spine, heart), abnormal images with a lesion-like blob or a foreign texture inside a lung, and the lesion mask of
every abnormal image (``masks/<image file>``, listed under ``"masks"`` in data.json) for localisation metrics."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from PIL import Image

from .atomic import write_text_atomic

__all__ = ["DEMO_SIZES", "make_demo_dataset", "resolve_dataset_dir"]

logger = logging.getLogger(__name__)

# split -> (normal, abnormal)
DEMO_SIZES = {"train": (300, 0), "unlabeled": (200, 300), "val": (50, 50), "test": (100, 100)}
_SIZE = 96


def _ellipse(yy, xx, cy, cx, ry, rx):
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1.0


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    coarse = rng.normal(size=(size // scale + 2, size // scale + 2))
    img = np.asarray(
        Image.fromarray(coarse.astype(np.float32)).resize((size + 2 * scale, size + 2 * scale), Image.BICUBIC)
    )
    return img[scale : scale + size, scale : scale + size]


def _anatomy(rng: np.random.Generator, abnormality: str | None) -> tuple[np.ndarray, np.ndarray]:
    """One (96, 96) image in [0, 1]: body, two lungs, spine, a heart on the left; optionally an abnormality
    ("blob", "texture", or "misplaced": the heart on the right, kept for experiments, not in the default set).

    Also returns the (96, 96) bool lesion mask (all False for a normal image): a blob's full width at half maximum
    (the disc where it adds at least half its peak), a texture's ellipse, a misplaced heart's half-maximum area.
    The mask is computed from the values already drawn: it consumes no random numbers, so the images are those of
    earlier versions for the same seed."""
    s = _SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dy, dx = rng.uniform(-2, 2, size=2)
    img = np.full((s, s), 0.05, np.float32)
    mask = np.zeros((s, s), bool)
    img[_ellipse(yy, xx, 50 + dy, 48 + dx, 44, 40)] = 0.55
    lungs = _ellipse(yy, xx, 46 + dy, 30 + dx, 26, 12) | _ellipse(yy, xx, 46 + dy, 66 + dx, 26, 12)
    img[lungs] = 0.25
    img[(np.abs(xx - 48 - dx) < 4) & (yy > 12)] = 0.8  # spine
    heart_x = 38 if abnormality != "misplaced" else 58
    heart = np.exp(-(((yy - 62 - dy) / 9) ** 2 + ((xx - heart_x - dx) / 8) ** 2))
    img = np.maximum(img, 0.75 * heart)
    if abnormality == "misplaced":
        mask = heart >= 0.5
    img += 0.05 * np.sin((yy - dy) / 3.0) * lungs  # rib-like stripes
    if abnormality == "blob":
        side = rng.choice([30, 66])
        cy, cx = 46 + dy + rng.uniform(-12, 12), side + dx + rng.uniform(-3, 3)
        r = rng.uniform(8, 12)
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
        img += rng.uniform(0.6, 0.8) * blob
        mask = blob >= 0.5
    elif abnormality == "texture":
        side = rng.choice([30, 66])
        patch = _ellipse(yy, xx, 46 + dy + rng.uniform(-10, 10), side + dx, rng.uniform(10, 14), rng.uniform(8, 11))
        speckle = np.kron(rng.random((s // 3, s // 3)) > 0.5, np.ones((3, 3)))  # coarse enough to survive 64x64
        img += 0.5 * patch * speckle
        mask = patch
    img *= rng.uniform(0.9, 1.1)
    img += 0.03 * _smooth_noise(rng, s, 8) + 0.01 * rng.normal(size=(s, s))
    return np.clip(img, 0, 1), mask


def make_demo_dataset(root: str, seed: int = 0, sizes: dict | None = None) -> str:
    """Write the demo set to ``root`` unless it is already there; returns root.

    ``root/images/*.png`` (96x96 grey) and ``root/data.json`` in the Med-AD layout, plus ``root/masks/<image
    file>`` for every abnormal image: its lesion mask (96x96, 0 background, 255 lesion), listed in data.json as
    ``"masks": {"<image file>": "masks/<image file>"}`` (image names as in the splits, mask paths relative to
    ``root``). The same seed and sizes give the same files byte for byte."""
    sizes = sizes or DEMO_SIZES
    if os.path.isfile(os.path.join(root, "data.json")):
        return root
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    kinds = ["blob", "texture"]
    lists: dict[str, dict[str, list[str]]] = {}
    masks: dict[str, str] = {}
    for split, (n_normal, n_abnormal) in sizes.items():
        lists[split] = {"0": [], "1": []}
        for label, count in (("0", n_normal), ("1", n_abnormal)):
            for i in range(count):
                kind = None if label == "0" else kinds[i % len(kinds)]
                name = f"{split}_{label}_{i:04d}.png"
                img, mask = _anatomy(rng, kind)
                Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(root, "images", name))
                if kind is not None:
                    masks[name] = f"masks/{name}"
                    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(root, masks[name]))
                lists[split][label].append(name)
    data = {
        "train": {"0": lists["train"]["0"], "unlabeled": lists["unlabeled"]},
        "val": lists["val"],
        "test": lists["test"],
        "masks": masks,
    }
    write_text_atomic(os.path.join(root, "data.json"), json.dumps(data, indent=1))  # last: it marks the set complete
    logger.info(f"wrote the demo data set to {root}")
    return root


def resolve_dataset_dir(dataset_dir: str, demo_dir: str) -> str:
    """``dataset_dir`` itself, or, for the value ``"demo"``, the demo set in ``demo_dir`` (generated if absent)."""
    return make_demo_dataset(demo_dir) if dataset_dir == "demo" else dataset_dir
