#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Put a trained model into ``pretrained/`` as the bundle's shipped model, with its hash and its test metrics.

1. The model's weights are stored in float16 when the anomaly scores of the float16 weights equal the float32
   weights' within ``--tolerance`` (1e-3) on every image of the ``val`` split (both run through ``run evaluating``);
   else in float32. The network still computes in float32 (the weights are cast back when loaded).
2. ``pretrained/<name>.pt`` and ``pretrained/manifest.json`` (file, sha256, description, dtype, the largest score
   difference, where the model came from) are written.
3. The stored file is evaluated once on the ``test`` split: ``pretrained/metrics_test.json`` (what the export's
   ``eval_metrics`` and the model card report).

Example (the shipped paediatric chest X-ray model, docs/results.md)::

    python scripts/pack_pretrained.py --model runs/ship/models/model.pt \\
        --dataset_dir ../shared/data/kermany_pneumonia --name sagan_paediatric_cxr \\
        --description "paediatric chest X-ray (Kermany et al. 2018), normal vs pneumonia" \\
        --training_command "python -m monai.bundle run training ..."
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.pretrained import MANIFEST, sha256_of  # noqa: E402
from bundle.settings import model_file_contents, read_model  # noqa: E402


def evaluate(model: str, dataset_dir: str, split: str, eval_dir: str) -> dict[str, float]:
    """``run evaluating`` of ``model`` on ``split``: {image: anomaly score} from its scores.csv."""
    config = "['configs/train.json','configs/evaluate.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", config]
    cmd += ["--dataset_dir", dataset_dir, "--model_path", model, "--eval_split", split, "--eval_dir", eval_dir]
    subprocess.run(cmd + ["--progress_bar", "False"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(eval_dir, "scores.csv")) as f:
        return {row["file"]: float(row["score"]) for row in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model.pt (chosen on val)")
    parser.add_argument("--dataset_dir", required=True, help="the Med-AD folder it was trained on")
    parser.add_argument("--name", required=True, help="file name stem in pretrained/")
    parser.add_argument("--description", required=True, help="what the model is for, one line")
    parser.add_argument("--training_command", required=True, help="the command that trained it (recorded)")
    parser.add_argument("--bundle_name", help="zoo bundle name of its export (default: <name>_anomaly)")
    parser.add_argument("--intended_use", required=True, help="for the model card, one sentence")
    parser.add_argument("--not_for", required=True, help="where it must not be used, for the model card")
    parser.add_argument("--machine", default="", help="where it was trained (recorded)")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--pretrained_dir", default=os.path.join(ROOT, "pretrained"))
    args = parser.parse_args(argv)

    state, settings = read_model(args.model)
    if settings is None:
        raise SystemExit(f"{args.model}: no settings recorded; pack a model trained by this bundle.")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with tempfile.TemporaryDirectory() as tmp:
        half_path = os.path.join(tmp, "model_fp16.pt")
        torch.save(model_file_contents(half, settings), half_path)
        full = evaluate(os.path.abspath(args.model), args.dataset_dir, "val", os.path.join(tmp, "fp32"))
        reduced = evaluate(half_path, args.dataset_dir, "val", os.path.join(tmp, "fp16"))
    if set(full) != set(reduced) or not full:
        raise SystemExit("the float32 and float16 evaluations scored different images")
    difference = max(abs(full[k] - reduced[k]) for k in full)
    use_half = difference <= args.tolerance
    print(f"largest |score(float16) - score(float32)| on {len(full)} val images: {difference:.2e}")

    os.makedirs(args.pretrained_dir, exist_ok=True)
    file = f"{args.name}.pt"
    path = os.path.join(args.pretrained_dir, file)
    torch.save(model_file_contents(half if use_half else state, settings), path)
    manifest = {
        "file": file,
        "sha256": sha256_of(path),
        "bytes": os.path.getsize(path),
        "description": args.description,
        "bundle_name": args.bundle_name or f"{args.name}_anomaly",
        "intended_use": args.intended_use,
        "not_for": args.not_for,
        "dtype": "float16" if use_half else "float32",
        "max_val_score_difference_float16": difference,
        "dataset": os.path.basename(os.path.normpath(args.dataset_dir)),
        "training_command": args.training_command,
        "machine": args.machine,
        "iteration": settings.get("iteration"),
        "selected_by": settings.get("selected_by"),
        "threshold": settings.get("threshold"),
    }
    with open(os.path.join(args.pretrained_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=4)
        f.write("\n")
    rel = os.path.relpath(path, ROOT)
    eval_dir = os.path.join(args.pretrained_dir, "eval_test")
    evaluate(rel, args.dataset_dir, "test", eval_dir)
    os.replace(os.path.join(eval_dir, "metrics.json"), os.path.join(args.pretrained_dir, "metrics_test.json"))
    shutil.rmtree(eval_dir)
    print(f"{rel}: {manifest['dtype']}, {manifest['bytes']} bytes, sha256 {manifest['sha256']}")
    print(json.dumps(json.load(open(os.path.join(args.pretrained_dir, "metrics_test.json"))), indent=1)[:2000])


if __name__ == "__main__":
    main()
