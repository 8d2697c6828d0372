# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reader of the user's own splits: folders or CSVs of known normals, unlabeled images and labelled val/test
images, taken as given."""

from __future__ import annotations

import os
from collections import Counter

from .core import ImporterError, Record, image_files, png_name, read_csv

__all__ = ["read_generic"]


def _records_from(
    source: str, role: str, patient_column: str, label: int | None = None, need_label: bool = False
) -> list[Record]:
    """Records of a folder (every image in it) or a CSV (column ``path``, relative to the CSV's folder, optional
    ``label``, ``split`` and ``patient_column``)."""
    if os.path.isdir(source):
        return [
            Record(f, label, f"{role}/" + png_name(os.path.relpath(f, source)), split=None) for f in image_files(source)
        ]
    if not source.lower().endswith(".csv"):
        raise ImporterError(f"{source}: neither a folder nor a .csv file.")
    required = ("path", "label") if need_label else ("path",)
    columns, rows = read_csv(source, required)
    base = os.path.dirname(os.path.abspath(source))
    records = []
    for line, row in enumerate(rows, start=2):
        if not row["path"]:
            raise ImporterError(f"{source}, line {line}: empty path.")
        path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
        rel = os.path.relpath(path, base)
        rel = os.path.basename(path) if rel.startswith("..") else rel
        value = row.get("label", "")
        if value not in ("", "0", "1"):
            raise ImporterError(f"{source}, line {line}: label {value!r}; expected 0 (normal) or 1 (abnormal).")
        if need_label and value == "":
            raise ImporterError(f"{source}, line {line}: empty label; expected 0 or 1.")
        split = row.get("split", "") or None
        records.append(
            Record(
                path,
                int(value) if value != "" else label,
                f"{role}/" + png_name(rel),
                patient=row.get(patient_column) or None,
                split=split,
            )
        )
    return records


def read_generic(
    normal: str, unlabeled: str | None = None, labelled: str | None = None, patient_column: str = "patient_id"
) -> tuple[list[Record], list[str]]:
    """Records of the user's own splits, each ``Record.split`` set.

    Args:
        normal: known normal images (T_n): a folder or a CSV with ``path`` (optional patient column).
        unlabeled: a folder of unlabeled images; a folder with subfolders ``0/`` and ``1/`` (labels known, as in
            Med-AD benchmarks); or a CSV with ``path`` and optional ``label``. Images of unknown label go to
            ``train/unlabeled/0``, which then means "unknown": train with ``--anomaly_ratio 0``.
        labelled: a folder with ``test/0``, ``test/1`` and optional ``val/0``, ``val/1``; or a CSV with ``path``,
            ``label`` and ``split`` (``val`` or ``test``).
        patient_column: the CSV column of patient IDs (optional).
    """
    records = list(_records_from(normal, "normal", patient_column, label=0))
    for r in records:
        if r.label != 0:
            raise ImporterError(f"{normal}: {r.source} has label {r.label}; the known normals must all be 0.")
        r.split = "train"
    notes = []
    if unlabeled:
        if os.path.isdir(unlabeled) and {"0", "1"} <= set(os.listdir(unlabeled)):
            unl = [
                Record(r.source, lab, r.name.replace("unlabeled/", f"unlabeled/{lab}/", 1), split="unlabeled")
                for lab in (0, 1)
                for r in _records_from(os.path.join(unlabeled, str(lab)), "unlabeled", patient_column)
            ]
        else:
            unl = _records_from(unlabeled, "unlabeled", patient_column)
        for r in unl:
            r.split = "unlabeled"
        if any(r.label is None for r in unl):
            notes.append(
                f"{sum(r.label is None for r in unl)} unlabeled images have no known label: they are listed under "
                "train/unlabeled/0, which here means 'unknown'; train with --anomaly_ratio 0 (T_u is then drawn "
                "from them alone)."
            )
        records += unl
    if labelled:
        if os.path.isdir(labelled):
            lab_records = []
            for split in ("val", "test"):
                for lab in (0, 1):
                    folder = os.path.join(labelled, split, str(lab))
                    if os.path.isdir(folder):
                        lab_records += [
                            Record(
                                f, lab, f"labelled/{split}/{lab}/" + png_name(os.path.relpath(f, folder)), split=split
                            )
                            for f in image_files(folder)
                        ]
            if not any(os.path.isdir(os.path.join(labelled, s)) for s in ("val", "test")):
                raise ImporterError(f"{labelled}: no 'test/0', 'test/1' (or 'val/0', 'val/1') subfolders.")
        else:
            read_csv(labelled, ("path", "label", "split"))
            lab_records = _records_from(labelled, "labelled", patient_column, need_label=True)
            for line, r in enumerate(lab_records, start=2):
                if r.split not in ("val", "test"):
                    raise ImporterError(f"{labelled}, line {line}: split {r.split!r}; expected 'val' or 'test'.")
        records += lab_records
    if not any(r.patient for r in records):
        notes.append("no patient IDs given: every image is treated as its own patient.")
    return _unique_names(records), notes


def _unique_names(records: list[Record]) -> list[Record]:
    seen: Counter[str] = Counter()
    sources: dict[str, str] = {}
    for r in records:
        if r.source in sources:
            raise ImporterError(f"{r.source}: listed twice (as {sources[r.source]} and {r.name}).")
        sources[r.source] = r.name
        key = r.name.lower()
        if seen[key]:
            r.name = f"{r.name[:-4]}_{seen[key] + 1}.png"
        seen[key] += 1
    return records
