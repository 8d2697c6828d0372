#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Why does the test specificity at the stored threshold differ from the promised one?

For each model file given (e.g. a run's ``model.pt``, chosen on val, and ``model_last.pt``, not chosen on anything),
scores the ``val`` and ``test`` splits with ``run evaluating`` and prints: the threshold, the realised specificity on
val and test normals with the interval the threshold promises (``specificity_interval``), the share of test normals
above the val normals' median, and the two-sample Kolmogorov-Smirnov distance between the val and test normal scores.

- If only the val-chosen model misses its promise, the choice of checkpoint on the same val normals that set the
  threshold is the cause (the chosen generator is the one that happened to score those normals low).
- If every model misses it, the val and test normals differ (a shift between the splits).

    python scripts/threshold_gap.py --dataset_dir ../shared/data/kermany_pneumonia \\
        --models runs/ship/models/model.pt runs/ship/models/model_last.pt --out runs/threshold_gap
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def evaluate(model: str, dataset_dir: str, split: str, eval_dir: str) -> tuple[dict, np.ndarray]:
    """metrics.json and the normal images' scores of ``run evaluating`` on ``split``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file"]
    cmd += ["['configs/train.json','configs/evaluate.json']", "--dataset_dir", dataset_dir, "--model_path", model]
    cmd += ["--eval_split", split, "--eval_dir", eval_dir, "--progress_bar", "False"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(eval_dir, "scores.csv")) as f:
        normal = np.array([float(r["score"]) for r in csv.DictReader(f) if r["label"] == "0"])
    return json.load(open(os.path.join(eval_dir, "metrics.json"))), normal


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """max |F_a - F_b| over the pooled values (two-sample Kolmogorov-Smirnov statistic)."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--out", default=os.path.join("runs", "threshold_gap"))
    args = parser.parse_args(argv)
    print("| model | threshold | val spec. | test spec. | promised interval (test) | test AUC | KS(val, test normals) "
          "| test normals above the val normals' median |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        name = os.path.splitext(os.path.basename(model))[0]
        val, val_normal = evaluate(os.path.abspath(model), args.dataset_dir, "val", os.path.join(args.out, name, "val"))
        test, test_normal = evaluate(
            os.path.abspath(model), args.dataset_dir, "test", os.path.join(args.out, name, "test")
        )
        low, high = test.get("specificity_interval") or (float("nan"), float("nan"))
        above = float((test_normal > np.median(val_normal)).mean())
        print(
            f"| {model} | {test['threshold']:.4f} | {val['specificity']:.3f} | {test['specificity']:.3f} "
            f"| [{low:.3f}, {high:.3f}] | {test['auc']:.3f} | {ks_distance(val_normal, test_normal):.3f} "
            f"| {above:.2f} |"
        )


if __name__ == "__main__":
    main()
