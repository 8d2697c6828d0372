#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Run several `monai.bundle run training` configurations (x seeds) and report, per configuration, the best val
AUC, the critic stalls and the minutes until val AUC first reached ``--quality`` (time to quality).

Selection uses the `val` split only. Each configuration is ``{config key: value}``; the key ``config_files`` (a list)
adds preset files after configs/train.json. Example (the sweep that chose the `cpu` preset, see docs/results.md):

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
from datetime import datetime

BEST = re.compile(r"Key metric: val_auc best value: ([0-9.]+) at epoch: (\d+)")
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (?:[\w.]+ - )?INFO - "
VAL = re.compile(STAMP + r"Epoch\[(\d+)\] Metrics -- val_ap: ([0-9.]+) val_auc: ([0-9.]+)")
START = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ignite\.engine\.engine\.SAGANTrainer - INFO - Engine run")
STALL = re.compile(r"critic stalled: iterations (\d+)-(\d+)")
REMEDY = re.compile(r"applied the remedy")
FINISHED = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - ignite\.engine\.engine\.SAGANTrainer - INFO - Engine run finished"
)


def minutes_between(start: str, end: str) -> float:
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    return (datetime.strptime(end, fmt) - datetime.strptime(start, fmt)).total_seconds() / 60


EPOCH_LENGTH = re.compile(r"Epoch: \d+/\d+, Iter: \d+/(\d+) --")


def iterations_to_quality(text: str, quality: float) -> int | None:
    """Training iterations until val AUC first reached ``quality`` (machine-independent, unlike the minutes)."""
    length = EPOCH_LENGTH.search(text)
    for _, epoch, _, auc in VAL.findall(text):
        if length and float(auc) >= quality:
            return int(epoch) * int(length.group(1))
    return None


def time_to_quality(text: str, quality: float) -> float | None:
    """Training minutes (from the trainer's start, validation included) until val AUC first reached ``quality``."""
    start = START.search(text)
    for stamp, _, _, auc in VAL.findall(text):
        if start and float(auc) >= quality:
            return round(minutes_between(start.group(1), stamp), 2)
    return None


def run_one(name: str, overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    out = os.path.join(args.out, f"{name}_seed{seed}")
    os.makedirs(out, exist_ok=True)
    overrides = dict(overrides)
    config_files = ["configs/train.json", *overrides.pop("config_files", [])]
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(config_files),
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
    result = parse_log(open(os.path.join(out, "log.txt")).read(), name, seed, args.quality)
    return {**result, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "overrides": overrides}


def parse_log(text: str, name: str, seed: int, quality: float) -> dict:
    """What a training log says of a run: best val AUC, the val curve, stalls, minutes to ``quality``."""
    best = BEST.findall(text)
    start, finish = START.search(text), FINISHED.search(text)
    return {
        "name": name,
        "seed": seed,
        "best_val_auc": float(best[-1][0]) if best else None,
        "best_epoch": int(best[-1][1]) if best else None,
        "val_curve": [(int(e), float(auc), float(ap)) for _, e, ap, auc in VAL.findall(text)],
        "stalls": [[int(a), int(b)] for a, b in STALL.findall(text)],
        "stall_remedies": len(REMEDY.findall(text)),
        "minutes_to_quality": time_to_quality(text, quality),
        "iterations_to_quality": iterations_to_quality(text, quality),
        "train_minutes": round(minutes_between(start.group(1), finish.group(1)), 2) if start and finish else None,
    }


def print_table(results: list[dict], names: list[str], quality: float) -> None:
    print(
        f"{'run':28s} {'seeds':>5s} {'best val AUC mean':>18s} {'sd':>6s} {'stalled':>7s} "
        f"{'median min to ' + str(quality):>20s} {'median it. to it':>16s} {'train min':>9s}"
    )
    for name in names:
        mine = [r for r in results if r["name"] == name]
        aucs = [r["best_val_auc"] for r in mine if r["best_val_auc"] is not None]
        reached = [r["minutes_to_quality"] for r in mine if r["minutes_to_quality"] is not None]
        minutes = [r["train_minutes"] for r in mine if r.get("train_minutes") is not None]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        mean = statistics.mean(aucs) if aucs else float("nan")
        ttq = f"{statistics.median(reached):.1f} ({len(reached)}/{len(mine)})" if reached else f"- (0/{len(mine)})"
        steps = [r["iterations_to_quality"] for r in mine if r.get("iterations_to_quality") is not None]
        itq = f"{statistics.median(steps):.0f}" if steps else "-"
        stalled = sum(1 for r in mine if r["stalls"])
        spent = f"{statistics.mean(minutes):9.1f}" if minutes else f"{'-':>9s}"
        print(f"{name:28s} {len(aucs):5d} {mean:18.4f} {sd:6.4f} {stalled:7d} {ttq:>20s} {itq:>16s} {spent}")
        for r in sorted(mine, key=lambda r: r["seed"]):
            print(f"    seed {r['seed']}: best val AUC {r['best_val_auc']}, stalls {r['stalls']}, remedies "
                  f"{r['stall_remedies']}, val AUC >= {quality} after {r['minutes_to_quality']} min / "
                  f"{r.get('iterations_to_quality')} it.")  # fmt: skip


def summarise(folder: str, quality: float) -> None:
    """The table of finished runs in ``folder`` (``<name>_seed<N>/log.txt``), e.g. runs of several sweeps."""
    results = []
    for entry in sorted(os.listdir(folder)):
        match = re.fullmatch(r"(.+)_seed(\d+)", entry)
        log = os.path.join(folder, entry, "log.txt")
        if match and os.path.isfile(log):
            text = open(log).read()
            if FINISHED.search(text):
                results.append(parse_log(text, match.group(1), int(match.group(2)), quality))
    print_table(results, sorted({r["name"] for r in results}), quality)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir")
    p.add_argument("--runs", help="JSON file: {name: {config key: value, ...}, ...}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--quality", type=float, default=0.95, help="val AUC of the time-to-quality column")
    p.add_argument("--summarise", action="store_true", help="only print the table of the finished runs in --out")
    args = p.parse_args()
    if args.summarise:
        summarise(args.out, args.quality)
        return
    if not (args.dataset_dir and args.runs):
        p.error("--dataset_dir and --runs are required to run a sweep")
    with open(args.runs) as f:
        runs = json.load(f)
    jobs = [(name, ov, seed) for name, ov in runs.items() for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda j: run_one(*j, args), jobs))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results, list(runs), args.quality)


if __name__ == "__main__":
    main()
