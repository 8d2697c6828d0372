#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Run several `monai.bundle run training` configurations (x seeds) and report the best val AUC of each.

Selection uses the `val` split only. Example (the sweep that chose the `cpu` preset, see docs/results.md):

    python scripts/sweep.py --dataset_dir ../shared/data/kermany_pneumonia --out runs/sweep \\
        --runs scripts/cpu_preset_sweep.json --seeds 0 1 --parallel 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BEST = re.compile(r"Key metric: val_auc best value: ([0-9.]+) at epoch: (\d+)")
VAL = re.compile(r"Epoch\[(\d+)\] Metrics -- val_ap: ([0-9.]+) val_auc: ([0-9.]+)")


def run_one(name: str, overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    out = os.path.join(args.out, f"{name}_seed{seed}")
    os.makedirs(out, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--meta_file",
        "metadata.json",
        "--dataset_dir",
        args.dataset_dir,
        "--seed",
        str(seed),
        "--ckpt_dir",
        os.path.join(out, "models"),
        "--output_dir",
        os.path.join(out, "tb"),
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else str(v) if isinstance(v, bool) else json.dumps(v)]
    start = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    text = open(os.path.join(out, "log.txt")).read()
    best = BEST.findall(text)
    curve = [(int(e), float(auc), float(ap)) for e, ap, auc in VAL.findall(text)]
    return {
        "name": name,
        "seed": seed,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        "best_val_auc": float(best[-1][0]) if best else None,
        "best_epoch": int(best[-1][1]) if best else None,
        "val_curve": curve,
        "overrides": overrides,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--runs", required=True, help="JSON file: {name: {config key: value, ...}, ...}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args()
    with open(args.runs) as f:
        runs = json.load(f)
    jobs = [(name, ov, seed) for name, ov in runs.items() for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(*j, args), jobs))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"{'run':28s} {'seeds':>5s} {'best val AUC mean':>18s} {'sd':>6s} {'s/run':>7s}")
    for name in runs:
        aucs = [r["best_val_auc"] for r in results if r["name"] == name and r["best_val_auc"] is not None]
        secs = [r["seconds"] for r in results if r["name"] == name]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        mean = statistics.mean(aucs) if aucs else float("nan")
        print(f"{name:28s} {len(aucs):5d} {mean:18.4f} {sd:6.4f} {statistics.mean(secs):7.1f}")


if __name__ == "__main__":
    main()
