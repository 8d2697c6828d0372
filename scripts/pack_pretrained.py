#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Put a trained model into ``pretrained/`` as the bundle's shipped model, with its hash and its test metrics.

0. Settings that the bundle stores with newer models and this model lacks are added, each listed in the manifest's
   ``settings_added``: ``domain`` (the in-domain check, fitted on the training images T_n and T_u drawn as training
   draws them with ``--seed`` and ``--anomaly_ratio``) and ``normal_scores`` (the scores of the normal ``val``
   images, from the evaluation below; their ``specificity`` quantile must give back the stored threshold).
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

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.conformal import stored_normal_scores  # noqa: E402
from bundle.pretrained import MANIFEST, sha256_of  # noqa: E402
from bundle.settings import model_file_contents, read_model  # noqa: E402


def evaluate(model: str, dataset_dir: str, split: str, eval_dir: str) -> dict[str, tuple[int, float]]:
    """``run evaluating`` of ``model`` on ``split``: {image: (label, anomaly score)} from its scores.csv."""
    config = "['configs/train.json','configs/evaluate.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file", config]
    cmd += ["--dataset_dir", dataset_dir, "--model_path", model, "--eval_split", split, "--eval_dir", eval_dir]
    subprocess.run(cmd + ["--progress_bar", "False"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(eval_dir, "scores.csv")) as f:
        return {row["file"]: (int(row["label"]), float(row["score"])) for row in csv.DictReader(f)}


def domain_settings(dataset_dir: str, settings: dict, seed: int, anomaly_ratio: float) -> dict:
    """The in-domain check as training stores it (:class:`bundle.domain.DomainRecord` on T_n and T_u)."""
    from monai.bundle import ConfigParser

    from bundle.data import ImageCache, image_items, load_medad_datalist
    from bundle.domain import DomainRecord
    from bundle.selection import training_sets

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.config.update({"image_size": settings["image_size"], "slice_index": settings.get("slice_index")})
    preprocessing = parser.get_parsed_content("preprocessing")
    sets = training_sets(load_medad_datalist(dataset_dir), anomaly_ratio, None, seed)
    caches = [ImageCache(image_items(files), preprocessing) for files in (sets.normal, sets.unlabeled)]
    return DomainRecord(caches).record()


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
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed (for its T_u draw)")
    parser.add_argument("--anomaly_ratio", type=float, default=0.6, help="the training run's anomaly ratio")
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
    difference = max(abs(full[k][1] - reduced[k][1]) for k in full)
    added = []
    if "normal_scores" not in settings:
        normal = [score for label, score in full.values() if label == 0]
        threshold = float(np.quantile(normal, settings["specificity"], method="higher"))  # as OperatingPointHandler
        if abs(threshold - settings["threshold"]) > 1e-4:
            raise SystemExit(
                f"the val normal scores give threshold {threshold}, the model stores {settings['threshold']}"
            )
        settings["normal_scores"] = stored_normal_scores(normal)
        added.append("normal_scores")
    if "domain" not in settings:
        settings.update(domain_settings(args.dataset_dir, settings, args.seed, args.anomaly_ratio))
        added.append("domain")
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
        "settings_added": added,
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
