# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""What every importer shares: the record of one source image, the result of an import, the error that names the
bad input, and the helpers that read source CSVs and folders."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "IMAGE_SUFFIXES",
    "SOURCE_NAMES",
    "ImporterError",
    "Record",
    "ImportResult",
    "handle_bad_file",
    "image_files",
    "png_name",
    "read_csv",
    "require_columns",
    "require_dir",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
SOURCE_NAMES = {"rsna": "RSNA Pneumonia", "vindr": "VinDr-CXR", "lag": "LAG", "generic": "generic"}


class ImporterError(ValueError):
    """Input that cannot be imported: the message names the file (or folder) and the problem."""


@dataclass
class Record:
    """One source image: its file, label (0 normal, 1 abnormal, None unknown), output name relative to
    ``OUT/images``, patient (None: not given) and, for the generic importer, the split the user gave."""

    source: str
    label: int | None
    name: str
    patient: str | None = None
    split: str | None = None


@dataclass
class ImportResult:
    """What an import wrote: ``splits[(split, label)]`` lists the records of ``train/0``, ``unlabeled/0|1``,
    ``val/0|1`` and ``test/0|1``; ``skipped`` holds (file, problem) of the bad files left out."""

    out: str
    splits: dict[tuple[str, int | None], list[Record]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unused: int = 0
    notes: list[str] = field(default_factory=list)


def handle_bad_file(record: Record, problem: str, on_bad_file: str, skipped: list[tuple[str, str]]) -> None:
    """Applies ``--on-bad-file``: "error" raises :class:`ImporterError` naming the file, "skip" appends it to
    ``skipped``."""
    if on_bad_file == "error":
        raise ImporterError(f"{record.source}: {problem} (--on-bad-file skip leaves such files out).")
    skipped.append((record.source, problem))


def read_csv(path: str, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The columns and rows (values stripped) of the CSV ``path``, refused if a ``required`` column is missing."""
    if not os.path.isfile(path):
        raise ImporterError(f"{path}: CSV file not found.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ImporterError(f"{path}: not a readable CSV file ({e}).") from e
    require_columns(path, columns, required)
    return columns, rows


def require_columns(path: str, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ImporterError(f"{path}: column(s) {', '.join(missing)} missing; the columns are {', '.join(columns)}.")


def require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ImporterError(f"{path}: {what} folder not found.")


def image_files(folder: str, exclude: Sequence[str] = ()) -> list[str]:
    """Every image file under ``folder`` (recursively, sorted), skipping hidden entries and folders in ``exclude``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude)
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def png_name(relative: str) -> str:
    """The output name of the source file at ``relative``: the same path, ``/``-separated, with suffix ``.png``."""
    stem = relative[: -len(".nii.gz")] if relative.lower().endswith(".nii.gz") else os.path.splitext(relative)[0]
    return stem.replace(os.sep, "/") + ".png"
