# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reader of the LAG glaucoma database (Li et al., CVPR 2019): class folders of fundus JPEGs."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .core import IMAGE_SUFFIXES, ImporterError, Record, image_files, png_name, require_dir

__all__ = ["read_lag"]


def read_lag(
    root: str,
    normal_dirs: Sequence[str] = ("non_glaucoma",),
    abnormal_dirs: Sequence[str] = ("suspicious_glaucoma", "glaucoma"),
    exclude_dirs: Sequence[str] = ("attention_map",),
) -> tuple[list[Record], list[str]]:
    """Records of LAG: every image under ``root/<normal dir>`` is 0, under ``root/<abnormal dir>`` 1 (recursively,
    skipping folders named in ``exclude_dirs``: LAG ships ophthalmologists' attention maps beside the images). Of the
    default folder names those present are used; at least one per class is required. No patient IDs."""
    require_dir(root, "LAG")
    records, notes = [], []
    for label, names in ((0, normal_dirs), (1, abnormal_dirs)):
        present = [n for n in names if os.path.isdir(os.path.join(root, n))]
        if not present:
            raise ImporterError(
                f"{root}: none of the {'normal' if label == 0 else 'abnormal'} class folders {list(names)} is there "
                f"(found: {sorted(os.listdir(root))}); name them with --{'normal' if label == 0 else 'abnormal'}-dir."
            )
        for name in present:
            files = image_files(os.path.join(root, name), exclude_dirs)
            if not files:
                raise ImporterError(f"{os.path.join(root, name)}: no images with a suffix in {IMAGE_SUFFIXES}.")
            records += [Record(f, label, png_name(os.path.relpath(f, root))) for f in files]
            notes.append(f"{name}/: {len(files)} images, label {label}.")
    notes.append("LAG gives no patient IDs: every image is split as its own patient.")
    return records, notes
