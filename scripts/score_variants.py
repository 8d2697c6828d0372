#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Which reduction of the heat map |x - x'| separates normal from abnormal best? Chosen on ``val`` only.

For each trained model given, restores every ``val`` image once (the test split only with ``--test``), then reduces
the same heat maps in several ways and prints the ROC AUC of each per model and as mean ± sd over the models:

- ``mean``: the paper's score, mean |x - x'| / 2 (:func:`bundle.transforms.scoring.anomaly_score`);
- ``mse``: mean (x - x')^2;
- ``top10`` / ``top01``: mean of the highest 10% / 1% of the heat map's pixels;
- ``inner``: mean over the central 80% x 80% of the image (borders, markers and collimation left out);
- ``smooth_max``: the maximum of the heat map after a 5x5 box filter.

The test split is scored only after a reduction was chosen on val (``--test`` with ``--reductions``), so that the
choice never sees it::

    python scripts/score_variants.py --dataset_dir ../shared/data/kermany_pneumonia --models runs/*/models/model.pt
    python scripts/score_variants.py ... --test --reductions mean top10
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.data import ImageCache, labelled_items, load_medad_datalist  # noqa: E402
from bundle.settings import generator_from_settings, read_model, settings_from_model  # noqa: E402


def _top_fraction(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = maps.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.mean(dim=1)


def _inner(maps: torch.Tensor, keep: float = 0.8) -> torch.Tensor:
    h, w = maps.shape[-2:]
    dh, dw = int(round(h * (1 - keep) / 2)), int(round(w * (1 - keep) / 2))
    return maps[..., dh : h - dh, dw : w - dw].mean(dim=(-3, -2, -1))


REDUCTIONS = {
    "mean": lambda m: m.mean(dim=(-3, -2, -1)) / 2.0,
    "mse": lambda m: (m**2).mean(dim=(-3, -2, -1)),
    "top10": lambda m: _top_fraction(m, 0.10),
    "top01": lambda m: _top_fraction(m, 0.01),
    "inner": _inner,
    "smooth_max": lambda m: F.avg_pool2d(m.mean(dim=1, keepdim=True), 5, stride=1).flatten(1).max(dim=1).values,
}


def heat_maps(model_path: str, dataset_dir: str, split: str) -> tuple[torch.Tensor, np.ndarray]:
    """(N, C, H, W) heat maps |x - x'| in [0, 2] of ``split`` and its (N,) labels, with the model's preprocessing."""
    state_dict, stored = read_model(model_path)
    settings = settings_from_model(state_dict, stored)
    generator = generator_from_settings(settings)
    generator.load_state_dict({k: v.float() for k, v in state_dict.items()})
    generator.eval()
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.update({"image_size": settings["image_size"], "slice_index": settings.get("slice_index")})
    items = labelled_items(load_medad_datalist(dataset_dir), split)
    dataset = ImageCache(items, parser.get_parsed_content("preprocessing"), cache=False, name=f"{split} images")
    maps, labels = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            batch = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
            x = torch.stack([torch.as_tensor(b["image"]) for b in batch])
            maps.append((x - generator(x)).abs())
            labels += [int(b["label"]) for b in batch]
    return torch.cat(maps), np.array(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--reductions", nargs="+", default=list(REDUCTIONS), choices=list(REDUCTIONS))
    parser.add_argument("--test", action="store_true", help="also score the test split (after choosing on val)")
    parser.add_argument("--out", default=None, help="write the per-model AUCs as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    splits = ["val", "test"] if args.test else ["val"]
    table: dict[str, dict[str, list[float]]] = {s: {r: [] for r in args.reductions} for s in splits}
    for model in args.models:
        for split in splits:
            maps, labels = heat_maps(model, args.dataset_dir, split)
            row = {r: float(compute_roc_auc(REDUCTIONS[r](maps), torch.as_tensor(labels))) for r in args.reductions}
            for r, auc in row.items():
                table[split][r].append(auc)
            print(f"{model} {split}: " + ", ".join(f"{r} {a:.3f}" for r, a in row.items()), flush=True)
    for split in splits:
        print(f"\n| reduction | {split} AUC mean ± sd over {len(args.models)} models |\n|---|---|")
        for r, aucs in table[split].items():
            print(f"| {r} | {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"models": args.models, "auc": table}, f, indent=2)


if __name__ == "__main__":
    main()
