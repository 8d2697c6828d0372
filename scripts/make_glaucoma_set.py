#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Carve LAG's task, glaucoma vs normal, from the ODIR fundus set, through the generic importer.

Kept: the normal eyes (``label`` 0) and the glaucoma eyes (``glaucoma`` 1) of ``odir_fundus/labels.csv``; other
diseases are left out. Patients without a glaucoma eye keep their split of ``odir_fundus/data.json`` (train/0,
unlabeled, val, test). Patients with one (their normal eyes too) are drawn anew, whole patients, with ``--seed``:
``--val_patients`` to val, ``--test_patients`` to test, the rest to the unlabeled set; the importer checks that no
patient is in two splits (``--patient-column patient_id``). ODIR's own split leaves 3 glaucoma eyes in val and 37 in
test, too few to measure a detector on.

    python scripts/make_glaucoma_set.py --odir ../shared/data/odir_fundus --out data/odir_glaucoma

writes the importer's inputs ``OUT_csv/{normal,unlabeled,labelled}.csv`` and the Med-AD folder (``OUT/images``,
``OUT/data.json``, ``OUT/labels.csv``, ``OUT/import.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def odir_splits(data: dict) -> dict[str, str]:
    """image name -> "normal" | "unlabeled" | "val" | "test" from an ODIR data.json."""
    where = {name: "normal" for name in data["train"]["0"]}
    for label in ("0", "1"):
        where.update({name: "unlabeled" for name in data["train"]["unlabeled"][label]})
        for split in ("val", "test"):
            where.update({name: split for name in data[split][label]})
    return where


def carve(labels: list[dict], where: dict[str, str], val_patients: int, test_patients: int, seed: int) -> dict:
    """{"normal": [...], "unlabeled": [(name, label)], "val": [(name, label)], "test": [(name, label)]}."""
    kept = [r for r in labels if r["label"] == "0" or r["glaucoma"] == "1"]
    glaucoma_patients = sorted({r["patient_id"] for r in kept if r["glaucoma"] == "1"}, key=int)
    random.Random(seed).shuffle(glaucoma_patients)
    drawn = {p: "val" for p in glaucoma_patients[:val_patients]}
    drawn.update({p: "test" for p in glaucoma_patients[val_patients : val_patients + test_patients]})
    out: dict[str, list] = {"normal": [], "unlabeled": [], "val": [], "test": []}
    for r in kept:
        label = int(r["glaucoma"] == "1")
        split = (
            drawn.get(r["patient_id"], "unlabeled") if r["patient_id"] in set(glaucoma_patients) else where[r["image"]]
        )
        if split == "normal" and label == 0:
            out["normal"].append(r)
        else:
            out["unlabeled" if split == "normal" else split].append((r, label))
    return out


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--odir", default=os.path.join(ROOT, "..", "shared", "data", "odir_fundus"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--val_patients", type=int, default=40)
    parser.add_argument("--test_patients", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    with open(os.path.join(args.odir, "labels.csv")) as f:
        labels = list(csv.DictReader(f))
    with open(os.path.join(args.odir, "data.json")) as f:
        where = odir_splits(json.load(f))
    parts = carve(labels, where, args.val_patients, args.test_patients, args.seed)
    sources = os.path.normpath(args.out) + "_csv"  # the importer wants its inputs outside its output folder
    os.makedirs(sources, exist_ok=True)
    images = os.path.abspath(os.path.join(args.odir, "images"))

    def row(r: dict, **extra: object) -> dict:
        return {"path": os.path.join(images, r["image"]), "patient_id": r["patient_id"], **extra}

    csvs = {k: os.path.join(sources, f"{k}.csv") for k in ("normal", "unlabeled", "labelled")}
    write_csv(csvs["normal"], [row(r) for r in parts["normal"]], ["path", "patient_id"])
    write_csv(csvs["unlabeled"], [row(r, label=y) for r, y in parts["unlabeled"]], ["path", "patient_id", "label"])
    labelled = [row(r, label=y, split=s) for s in ("val", "test") for r, y in parts[s]]
    write_csv(csvs["labelled"], labelled, ["path", "patient_id", "label", "split"])
    for name, items in parts.items():
        abnormal = sum(1 for x in items if isinstance(x, tuple) and x[1] == 1)
        print(f"{name}: {len(items)} images, {abnormal} glaucoma")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "import_medad.py"), "generic", "--normal", csvs["normal"]]
    cmd += ["--unlabeled", csvs["unlabeled"], "--labelled", csvs["labelled"], "--patient-column", "patient_id"]
    cmd += ["--out", args.out, "--overwrite", "--seed", str(args.seed), "--size", str(args.size), "--workers", "1"]
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
