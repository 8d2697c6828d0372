# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The output folder of an import: images are converted into a staging folder and published at the end, with
``data.json`` written last, so that a folder holding a ``data.json`` is always a complete import."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable

from ..atomic import PARTIAL_PREFIX, write_text_atomic
from .core import ImporterError, Record

__all__ = ["OUTPUT_ENTRIES", "STAGING", "Workspace"]

STAGING = ".import-partial"
OUTPUT_ENTRIES = ("images", "data.json", "labels.csv", "import.json")


def _json_text(content: dict) -> str:
    return json.dumps(content, indent=1) + "\n"


class Workspace:
    """The output folder ``out``: refuses one that overlaps an input, or a non-empty one unless ``overwrite``;
    converts into ``OUT/.import-partial`` and publishes with data.json written last (each file through a temporary
    file and a rename, :mod:`bundle.atomic`).

    A context manager: an exception inside it removes the staging folder (and ``out`` if that leaves it empty),
    so the previous import in ``out``, if any, is untouched."""

    def __init__(self, out: str, inputs: Iterable[str], overwrite: bool) -> None:
        self.out = os.path.abspath(out)
        real_out = os.path.realpath(self.out)
        for path in inputs:
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_out]) in (real, real_out):
                raise ImporterError(f"{out}: the output folder overlaps the input {path}; choose a folder outside it.")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ImporterError(f"{out}: exists and is not a folder.")
        entries = os.listdir(self.out) if os.path.isdir(self.out) else []
        leftovers = [e for e in entries if e.startswith(PARTIAL_PREFIX)]  # files of an interrupted publish
        present = sorted(e for e in entries if e != STAGING and e not in leftovers)
        if present and not overwrite:
            raise ImporterError(
                f"{out}: not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); pass --overwrite "
                f"to replace {', '.join(OUTPUT_ENTRIES)} there, or choose a new folder."
            )
        for leftover in leftovers:
            os.remove(os.path.join(self.out, leftover))
        self.staging = os.path.join(self.out, STAGING)
        shutil.rmtree(self.staging, ignore_errors=True)  # left by an interrupted run
        os.makedirs(os.path.join(self.staging, "images"))

    def path(self, name: str) -> str:
        """Where the image ``name`` (relative to ``OUT/images``) is converted to before publishing."""
        return os.path.join(self.staging, "images", name)

    def discard(self, records: Iterable[Record]) -> None:
        for r in records:
            if os.path.exists(self.path(r.name)):
                os.remove(self.path(r.name))

    def publish(self, data: dict, rows: list[list[str]], info: dict) -> None:
        """Replaces images/, labels.csv (``rows``), import.json (``info``) and data.json (``data``) in ``out``."""
        old = os.path.join(self.out, "data.json")
        if os.path.exists(old):
            os.remove(old)  # first: a half-replaced folder must not look complete
        for entry in ("images", "labels.csv", "import.json"):
            target = os.path.join(self.out, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
        os.replace(os.path.join(self.staging, "images"), os.path.join(self.out, "images"))
        labels = io.StringIO()
        csv.writer(labels, lineterminator="\n").writerows([["file", "split", "label", "patient_id", "source"]] + rows)
        write_text_atomic(os.path.join(self.out, "labels.csv"), labels.getvalue())
        write_text_atomic(os.path.join(self.out, "import.json"), _json_text(info))
        write_text_atomic(os.path.join(self.out, "data.json"), _json_text(data))
        shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        """Removes the staging folder, and ``out`` if that leaves it empty."""
        shutil.rmtree(self.staging, ignore_errors=True)
        if os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:
            self.abandon()
