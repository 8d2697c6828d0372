#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Set a trained model's operating threshold on more normal images than the ``val`` normals it was set on.

A model's threshold is the ``specificity`` quantile of the anomaly scores of the normal ``val`` images (100 on the
chest set), which it stores (``normal_scores``). With n normal scores the specificity realised on new normal images
of the same kind lies in an interval whose width shrinks like 1 / sqrt(n) (``specificity_interval``, reported by
``run evaluating``). This script scores more normal images with the model, pools their scores with the stored ones,
and writes a copy of the model whose threshold, ``threshold_normals``, ``threshold_rank`` and ``normal_scores`` (the
conformal p-values' reference) come from the pooled scores, with a ``threshold_calibration`` record (sources,
counts, the previous threshold). Weights, pixel threshold and in-domain check are unchanged.

Normal images it can use, never ``test``:

- ``--dataset_dir`` with ``--seed`` / ``--anomaly_ratio`` (as the model was trained): the training folder's normal
  images the run did not train on (:func:`bundle.selection.spare_normals`: ``train/unlabeled/0`` images not drawn
  into T_u, and a pseudo-AUC hold-out's normal images);
- ``--normals`` files or folders of known-normal images, e.g. a site's own normal studies: the threshold then
  promises its specificity for images like those.

    python scripts/calibrate_threshold.py --model pretrained/sagan_paediatric_cxr.pt \\
        --dataset_dir ../shared/data/kermany_pneumonia --seed 0 --out runs/calibrated/model.pt
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.atomic import save_torch_atomic  # noqa: E402
from bundle.data import list_images, load_medad_datalist  # noqa: E402
from bundle.handlers.operating_point import score_threshold  # noqa: E402
from bundle.selection import spare_normals, training_sets  # noqa: E402
from bundle.settings import model_file_contents, read_model  # noqa: E402


def anomaly_scores(model: str, files: list[str]) -> np.ndarray:
    """The model's anomaly scores of ``files``, computed by the bundle's inference workflow: one per 2D image and
    one per scored slice of a volume (rows ``<file>#slice=<k>``; the threshold is on slice scores, as in training)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    with tempfile.TemporaryDirectory() as out:
        parser.update({"bundle_root": ROOT, "model_path": model, "input_path": files, "output_dir": out})
        parser.get_parsed_content("inferring")
        with open(os.path.join(out, "scores.csv")) as f:
            scores = {row[0]: float(row[1]) for row in csv.reader(f)}
    per_file = {f: [v for name, v in scores.items() if name == f or name.startswith(f"{f}#slice=")] for f in files}
    missing = [f for f, values in per_file.items() if not values]
    if missing:
        raise RuntimeError(f"{len(missing)} images were not scored, e.g. {missing[0]}")
    return np.array([v for f in files for v in per_file[f]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model file that stores its normal scores")
    parser.add_argument("--out", required=True, help="the calibrated copy of the model")
    parser.add_argument("--dataset_dir", help="the Med-AD folder the model was trained on (its spare normals)")
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed (which images it drew)")
    parser.add_argument("--anomaly_ratio", type=float, default=0.6, help="the training run's anomaly ratio")
    parser.add_argument("--pseudo_holdout", type=float, default=0.0, help="the training run's pseudo_holdout")
    parser.add_argument("--pseudo_holdout_min", type=int, default=10, help="the training run's pseudo_holdout_min")
    parser.add_argument("--normals", nargs="*", default=[], help="files or folders of known-normal images")
    args = parser.parse_args(argv)

    state, settings = read_model(args.model)
    if not settings or not settings.get("normal_scores"):
        raise SystemExit(f"{args.model}: the model stores no normal scores to pool with; retrain with bundle >= 0.9.")
    files, sources = [], {}
    if args.dataset_dir:
        datalist = load_medad_datalist(args.dataset_dir)
        sets = training_sets(
            datalist, args.anomaly_ratio, None, args.seed, holdout_fraction=args.pseudo_holdout,
            holdout_min=args.pseudo_holdout_min,
        )  # fmt: skip
        spare = spare_normals(datalist, sets)
        files += spare
        sources["spare training-folder normals"] = len(spare)
    for path in args.normals:
        found = [item["image"] for item in list_images(path)]
        files += found
        sources[path] = len(found)
    if not files:
        raise SystemExit("no normal images to add: give --dataset_dir and/or --normals.")
    stored = np.asarray(settings["normal_scores"], dtype=np.float64)
    if len(stored) != settings.get("threshold_normals", len(stored)):
        raise SystemExit(f"{args.model} stores {len(stored)} of its {settings['threshold_normals']} normal scores.")
    added = anomaly_scores(args.model, files)
    chosen = score_threshold(np.concatenate([stored, added]), float(settings["specificity"]))
    record = {
        "sources": {"normal scores stored with the model": len(stored), **sources},
        "previous_threshold": settings["threshold"],
        "previous_threshold_normals": len(stored),
        "added_scores_above_previous_threshold": int((added > settings["threshold"]).sum()),
    }
    settings = {**settings, **chosen, "threshold_calibration": record}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_torch_atomic(model_file_contents(state, settings), args.out)
    summary = {k: chosen[k] for k in ("threshold", "threshold_normals", "threshold_rank")}
    print(json.dumps({"out": args.out, **summary, **record}, indent=1))


if __name__ == "__main__":
    main()
