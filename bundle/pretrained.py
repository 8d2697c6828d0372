# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The generator shipped in ``pretrained/``: which file it is, its hash, and when the configs fall back to it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

__all__ = ["PRETRAINED_DIR", "pretrained_manifest", "pretrained_model_path", "sha256_of", "trained_or_pretrained"]

logger = logging.getLogger(__name__)

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained")
MANIFEST = "manifest.json"


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_manifest(pretrained_dir: str = PRETRAINED_DIR) -> dict[str, Any]:
    """``pretrained/manifest.json``: ``{"file": ..., "sha256": ..., "description": ..., ...}`` of the shipped model."""
    with open(os.path.join(pretrained_dir, MANIFEST)) as f:
        return json.load(f)


def pretrained_model_path(pretrained_dir: str = PRETRAINED_DIR, verify: bool = True) -> str:
    """Path of the shipped model; with ``verify`` its sha256 must be the manifest's.

    Raises:
        FileNotFoundError: no manifest or no model file (a copy of the repository without ``pretrained/``).
        ValueError: the file's hash is not the manifest's (a damaged or replaced file, or a Git LFS pointer).
    """
    manifest = pretrained_manifest(pretrained_dir)
    path = os.path.join(pretrained_dir, manifest["file"])
    if verify:
        found = sha256_of(path)
        if found != manifest["sha256"]:
            raise ValueError(
                f"{path}: sha256 {found} is not the shipped model's {manifest['sha256']} ({MANIFEST}); the file is "
                "damaged or was replaced. Restore it from the repository (git checkout -- pretrained)."
            )
    return path


def trained_or_pretrained(model_path: str, pretrained_dir: str = PRETRAINED_DIR) -> str:
    """``model_path`` when that file exists (a locally trained model), else the shipped pretrained model, with a
    log line saying which one is used. Without either, ``model_path`` (whose loader then says that it is missing)."""
    if os.path.isfile(model_path):
        logger.info(f"model: {model_path} (trained locally)")
        return model_path
    try:
        path = pretrained_model_path(pretrained_dir)
    except FileNotFoundError:
        return model_path
    manifest = pretrained_manifest(pretrained_dir)
    logger.warning(
        f"no trained model at {model_path}: using the shipped pretrained model {path} ({manifest['description']}; "
        f"sha256 {manifest['sha256'][:12]}). Train one, or pass --model_path, for other data."
    )
    return path
