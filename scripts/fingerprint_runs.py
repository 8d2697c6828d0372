#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Fingerprints of short training + scoring runs, to show that a refactoring changed nothing.

For each preset (the demo defaults, and the speed presets that run on this machine) trains ``--iterations`` on the
demo data with a fixed seed, evaluates the final generator on ``test``, and records the sha256 of the final
checkpoint's generator and critic parameters and of the test scores. Run it before and after a change, on the same
machine with the same thread count, and compare:

    OMP_NUM_THREADS=1 python scripts/fingerprint_runs.py --out runs/fingerprint_before.json
    ... change the code ...
    OMP_NUM_THREADS=1 python scripts/fingerprint_runs.py --out runs/fingerprint_after.json \\
        --compare runs/fingerprint_before.json

Exit status 1 when ``--compare`` finds a difference.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "demo": [],
    "fast": ["configs/presets/fast.json"],
    "fast_critic_channels_last": ["configs/presets/fast.json"],
}
# (before 0.10 the switch was the top-level key critic_channels_last)
EXTRA = {
    "fast_critic_channels_last": [
        "--discriminator#channels_last",
        "True",
        "--train#trainer#critic_channels_last",
        "True",
    ]
}


def state_hash(state: dict) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if torch.is_tensor(value):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(args: list[str], log: str) -> None:
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=ROOT, stdout=f, stderr=f)
    if proc.returncode:
        raise SystemExit(f"`monai.bundle run {args[0]}` failed; see {log}")


def fingerprint(preset: str, data: str, iterations: int, work: str) -> dict:
    config = ["configs/train.json", *PRESETS[preset]]
    models, log = os.path.join(work, preset, "models"), os.path.join(work, f"{preset}.log")
    run(
        ["training", "--config_file", str(config), "--dataset_dir", data, "--ckpt_dir", models,
         "--output_dir", os.path.join(work, preset, "tb"), "--seed", "0", "--iterations", str(iterations),
         "--val_interval", str(iterations), "--progress_bar", "False", *EXTRA.get(preset, [])],
        log,
    )  # fmt: skip
    final = torch.load(os.path.join(models, "checkpoint_final.pt"), map_location="cpu", weights_only=False)
    eval_dir = os.path.join(work, preset, "eval")
    run(
        ["evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']", "--dataset_dir", data,
         "--ckpt_dir", models, "--model_path", os.path.join(models, "model_last.pt"), "--eval_split", "test",
         "--eval_dir", eval_dir, "--progress_bar", "False"],
        log,
    )  # fmt: skip
    with open(os.path.join(eval_dir, "scores.csv")) as f:
        scores = [row["score"] for row in csv.DictReader(f)]
    return {
        "generator": state_hash(final["generator"]),
        "critic": state_hash(final["discriminator"]),
        "test_scores": hashlib.sha256("\n".join(scores).encode()).hexdigest(),
        "n_scores": len(scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="Med-AD data set (default: the demo set)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--out", required=True, help="JSON file for the fingerprints")
    parser.add_argument("--compare", help="fingerprints of an earlier run to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result = {
            "threads": torch.get_num_threads(),
            **{p: fingerprint(p, args.data, args.iterations, work) for p in args.presets},
        }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if args.compare:
        before = json.load(open(args.compare))
        differ = [p for p in args.presets if before.get(p) != result[p]]
        print("identical to " + args.compare if not differ else f"DIFFERENT from {args.compare}: {differ}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
