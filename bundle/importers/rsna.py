# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reader of the RSNA Pneumonia Detection Challenge (Kaggle): DICOMs labelled by
``stage_2_detailed_class_info.csv``."""

from __future__ import annotations

import os

from .core import ImporterError, Record, read_csv, require_columns, require_dir

__all__ = ["RSNA_CLASSES", "RSNA_NOT_NORMAL", "read_rsna"]

RSNA_CLASSES = {"Normal": 0, "Lung Opacity": 1, "No Lung Opacity / Not Normal": 1}
RSNA_NOT_NORMAL = "No Lung Opacity / Not Normal"


def read_rsna(images_dir: str, csv_path: str, not_normal: str = "exclude") -> tuple[list[Record], list[str]]:
    """Records of the RSNA Pneumonia Detection Challenge: ``images_dir/<patientId>.dcm`` labelled by
    ``stage_2_detailed_class_info.csv`` (patientId,class; one row per box, so IDs repeat). "Normal" is 0, "Lung
    Opacity" 1; "No Lung Opacity / Not Normal" is left out (``not_normal="exclude"``, the Med-AD repartition:
    8851 normal + 6012 lung-opacity images) or counted abnormal (``"abnormal"``). One image per patient.

    Returns:
        the records sorted by patient ID, and notes for the summary.
    """
    if not_normal not in ("exclude", "abnormal"):
        raise ValueError(f"not_normal must be 'exclude' or 'abnormal', got {not_normal!r}.")
    require_dir(images_dir, "RSNA DICOM")
    columns, rows = read_csv(csv_path, ())
    if "Target" in columns and "class" not in columns:
        raise ImporterError(
            f"{csv_path}: this is the box file (Target); pass stage_2_detailed_class_info.csv, whose 'class' column "
            "separates 'Normal' from 'No Lung Opacity / Not Normal'."
        )
    require_columns(csv_path, columns, ("patientId", "class"))
    labels: dict[str, int | None] = {}
    for line, row in enumerate(rows, start=2):
        pid, cls = row["patientId"], row["class"]
        if cls not in RSNA_CLASSES:
            raise ImporterError(
                f"{csv_path}, line {line}: unknown class {cls!r}; expected one of {list(RSNA_CLASSES)}."
            )
        if not pid:
            raise ImporterError(f"{csv_path}, line {line}: empty patientId.")
        label = None if (cls == RSNA_NOT_NORMAL and not_normal == "exclude") else RSNA_CLASSES[cls]
        if pid in labels and labels[pid] != label:
            raise ImporterError(
                f"{csv_path}, line {line}: patient {pid} has class {cls!r} here and another class earlier."
            )
        labels[pid] = label
    excluded = sum(1 for v in labels.values() if v is None)
    listed = set(labels)
    on_disk = {f[: -len(".dcm")] for f in os.listdir(images_dir) if f.lower().endswith(".dcm")}
    records = [
        Record(os.path.join(images_dir, f"{pid}.dcm"), label, f"{pid}.png", patient=pid)
        for pid, label in sorted(labels.items())
        if label is not None
    ]
    notes = [f"{len(listed)} patients in {os.path.basename(csv_path)}, one image each; the patient ID is patientId."]
    if excluded:
        notes.append(
            f"{excluded} '{RSNA_NOT_NORMAL}' images left out, as in the Med-AD repartition "
            "(--not-normal abnormal counts them abnormal)."
        )
    if on_disk - listed:
        notes.append(f"{len(on_disk - listed)} DICOM files in {images_dir} are not in the CSV: ignored.")
    return records, notes
