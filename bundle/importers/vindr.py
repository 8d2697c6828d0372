# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reader of VinDr-CXR (Kaggle VinBigData or PhysioNet): DICOMs labelled by ``train.csv`` or
``image_labels_train.csv``."""

from __future__ import annotations

import os

from .core import ImporterError, Record, read_csv, require_dir

__all__ = ["VINDR_NORMAL", "read_vindr"]

VINDR_NORMAL = "No finding"


def read_vindr(images_dir: str, csv_path: str) -> tuple[list[Record], list[str]]:
    """Records of VinDr-CXR: ``images_dir/<image_id>.dicom`` labelled by the Kaggle ``train.csv`` (image_id,
    class_name, ..., rad_id: one row per finding of each reader) or PhysioNet's ``image_labels_train.csv`` (image_id,
    rad_id, one 0/1 column per label). An image is normal (0) only if every row of it says "No finding".
    VinDr-CXR gives no patient IDs: each image is treated as its own patient."""
    require_dir(images_dir, "VinDr-CXR DICOM")
    columns, rows = read_csv(csv_path, ("image_id",))
    if "class_name" in columns:
        normal_row = [row["class_name"] == VINDR_NORMAL for row in rows]
    elif VINDR_NORMAL in columns:
        normal_row = [row[VINDR_NORMAL] in ("1", "1.0") for row in rows]
    else:
        raise ImporterError(
            f"{csv_path}: neither a 'class_name' column (Kaggle train.csv) nor a '{VINDR_NORMAL}' column "
            f"(PhysioNet image_labels_train.csv); the columns are {', '.join(columns)}."
        )
    normal: dict[str, bool] = {}
    for line, (row, is_normal) in enumerate(zip(rows, normal_row), start=2):
        if not row["image_id"]:
            raise ImporterError(f"{csv_path}, line {line}: empty image_id.")
        normal[row["image_id"]] = normal.get(row["image_id"], True) and is_normal
    records = []
    for image_id, is_normal in sorted(normal.items()):
        path = os.path.join(images_dir, f"{image_id}.dicom")
        if not os.path.exists(path) and os.path.exists(os.path.join(images_dir, f"{image_id}.dcm")):
            path = os.path.join(images_dir, f"{image_id}.dcm")
        records.append(Record(path, 0 if is_normal else 1, f"{image_id}.png"))
    notes = [
        f"{len(normal)} images in {os.path.basename(csv_path)} ({len(rows)} rows); normal = every reader row says "
        f"'{VINDR_NORMAL}'.",
        "VinDr-CXR gives no patient IDs: every image is split as its own patient.",
    ]
    return records, notes
