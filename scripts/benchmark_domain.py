# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Measure the in-domain check (:mod:`bundle.domain`) of a trained model: how often each kind of image is flagged
"outside the training domain".

    OMP_NUM_THREADS=1 python scripts/benchmark_domain.py --model runs/screen/base_seed0/models/model.pt \\
        --data_root ../shared/data/kermany_pneumonia --fundus_root ../shared/data/odir_fundus \\
        --csv docs/domain_benchmark.csv

The images go through the bundle's own preprocessing (``preprocessing`` of ``configs/inference.json`` with the
model's ``image_size`` and ``slice_index``), so they are exactly what the model sees. The descriptor is fitted on the
normal training images (``train/0``) and its threshold calibrated on held-out training normals (cross-fitting inside
:meth:`bundle.domain.DomainDescriptor.fit`); ``val`` and ``test`` are only measured. Rows (target in brackets):
chest val / test normals and abnormals (<= 5% flagged), the fundus set (>= 95%), the synthetic demo test set
(>= 95%), and close shifts of the chest test images (>= 95% where achievable): inverted intensities, rotated 90
degrees, the left half resized back to full width (one lung), a gamma curve (gamma 2 on [0, 1]). Each rate comes with
its 95% Wilson score interval. The table is printed as markdown and written to ``--csv``.
``--compare`` adds the same rows for descriptors on the generator's bottleneck features and on the image statistics
of the restored image G(x) (comparison only).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.data import load_medad_datalist  # noqa: E402
from bundle.demo import make_demo_dataset  # noqa: E402
from bundle.domain import DomainDescriptor, bottleneck_features, domain_features  # noqa: E402
from bundle.selection import training_sets  # noqa: E402
from bundle.settings import generator_from_settings, load_model_settings, read_model  # noqa: E402

COLUMNS = ["features", "set", "n", "flagged", "rate", "ci_low", "ci_high", "target", "met"]


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rank_auc(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """ROC AUC of scores pos > neg (ties count one half)."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def bundle_preprocessing(settings: dict):
    """``preprocessing`` of configs/inference.json for the model's image size and slice index."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser["image_size"] = settings["image_size"]
    parser["slice_index"] = settings["slice_index"]
    return parser.get_parsed_content("preprocessing")


def load_images(files: list[str], transform) -> torch.Tensor:
    """(n, C, H, W) float32 in [-1, 1]."""
    out = []
    for f in files:
        image = transform({"image": f})["image"]
        out.append(torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image).float())
    return torch.stack(out)


def shifts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Close shifts of images (n, C, H, W) in [-1, 1]."""
    h, w = images.shape[-2:]
    return {
        "shift: inverted": -images,
        "shift: rotated 90": torch.rot90(images, 1, (2, 3)),
        "shift: left half resized": F.interpolate(images[..., :, : w // 2], size=(h, w), mode="bilinear"),
        "shift: gamma 2": ((images + 1) / 2) ** 2 * 2 - 1,
    }


def batched(fn, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained models/model.pt")
    parser.add_argument("--data_root", default=os.path.join(ROOT, "..", "shared", "data", "kermany_pneumonia"))
    parser.add_argument("--fundus_root", default=os.path.join(ROOT, "..", "shared", "data", "odir_fundus"))
    parser.add_argument("--fundus_images", type=int, default=400, help="random fundus test images to use")
    parser.add_argument("--quantile", type=float, default=0.995, help="threshold quantile of held-out normals")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also measure descriptors on the generator's bottleneck and on the image statistics of G(x)",
    )
    parser.add_argument("--csv", default=None, help="write the table here")
    parser.add_argument(
        "--fit_on",
        choices=("normal", "normal+unlabeled"),
        default="normal+unlabeled",
        help="fit on train/0 only, or on train/0 and the unlabeled set T_u drawn as training draws it (AR 0.6, "
        "seed 0; what training stores with the model)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()

    settings = load_model_settings(args.model)
    state, _ = read_model(args.model)
    generator = generator_from_settings(settings)
    generator.load_state_dict(state)
    generator.eval()
    transform = bundle_preprocessing(settings)

    chest = load_medad_datalist(args.data_root)
    fit_files = list(chest.normal)
    if args.fit_on == "normal+unlabeled":
        fit_files += list(training_sets(chest).unlabeled)
    train = load_images(fit_files, transform)
    sets: dict[str, torch.Tensor] = {}
    for split in ("val", "test"):
        for label, what in ((0, "normals"), (1, "abnormals")):
            files = getattr(chest, split).get(label, [])
            if files:
                sets[f"chest {split} {what}"] = load_images(files, transform)
    if os.path.isdir(args.fundus_root):
        fundus = load_medad_datalist(args.fundus_root)
        files = [f for label in sorted(fundus.test) for f in fundus.test[label]]
        pick = np.random.default_rng(0).choice(len(files), min(args.fundus_images, len(files)), replace=False)
        sets["fundus (ODIR) test"] = load_images([files[i] for i in sorted(pick)], transform)
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_medad_datalist(make_demo_dataset(os.path.join(tmp, "demo")))
        sets["synthetic demo test"] = load_images(demo.test[0] + demo.test[1], transform)
    test = torch.cat([sets[k] for k in ("chest test normals", "chest test abnormals") if k in sets])
    sets.update(shifts(test))

    kinds = {"image statistics": lambda x: domain_features(x)}
    if args.compare:
        kinds["generator bottleneck"] = lambda x: bottleneck_features(x, generator)
        kinds["image statistics of G(x)"] = lambda x: domain_features(generator(x))
    rows = []
    notes = []
    for kind, fn in kinds.items():
        descriptor = DomainDescriptor()
        with torch.no_grad():
            descriptor.fit(batched(fn, train), quantile=args.quantile, folds=args.folds)
            distances = {name: descriptor.distance(batched(fn, images)) for name, images in sets.items()}
        for name, d in distances.items():
            flagged = int((~(torch.isfinite(d) & (d <= descriptor.threshold))).sum())
            n = len(d)
            low, high = wilson_interval(flagged, n)
            target = "<= 5%" if name.startswith("chest") else ">= 95%"
            met = flagged / n <= 0.05 if name.startswith("chest") else flagged / n >= 0.95
            rows.append([kind, name, n, flagged, flagged / n, low, high, target, "yes" if met else "no"])
        if "chest test normals" in distances and "chest test abnormals" in distances:
            auc = rank_auc(distances["chest test normals"], distances["chest test abnormals"])
            notes.append(
                f"{kind}: AUC of the domain distance, chest test abnormals vs normals = {auc:.3f} "
                "(0.5 = blind to abnormality)"
            )
        notes.append(
            f"{kind}: fitted on {train.shape[0]} images ({args.fit_on}), D = {descriptor.mean.shape[0]}, shrinkage "
            f"{descriptor.info['shrinkage']:.3f}, threshold {descriptor.threshold:.2f} (quantile "
            f"{args.quantile} of {args.folds}-fold x {descriptor.info['repeats']} held-out distances)"
        )

    print(f"model {args.model} (image_size {settings['image_size']}), data {args.data_root}\n")
    print("| features | set | n | flagged | rate | 95% Wilson CI | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, name, n, flagged, rate, low, high, target, met in rows:
        print(
            f"| {kind} | {name} | {n} | {flagged} | {100 * rate:.1f}% | {100 * low:.1f}-{100 * high:.1f}% "
            f"| {target} | {met} |"
        )
    print()
    for note in notes:
        print(note)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow([f"{v:.4f}" if isinstance(v, float) else v for v in row])


if __name__ == "__main__":
    main()
