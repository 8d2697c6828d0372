# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Crash-safe checkpoints: MONAI's CheckpointSaver writing through a temporary file and an atomic rename."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from ..atomic import PARTIAL_PREFIX, write_atomic

__all__ = ["AtomicCheckpointSaver", "CheckpointWriteError", "latest_checkpoint", "resume_checkpoint"]

logger = logging.getLogger(__name__)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only folder, ...); the previous one is kept."""


class _AtomicDiskSaver(DiskSaver):
    """ignite DiskSaver with ``atomic=True`` (temporary file, then ``os.replace``) and an optional fixed name.

    With a fixed name the old file is never deleted before the new one is in place: the rename replaces it.
    The temporary file is ``.partial-*.pt`` in the same folder, flushed to the disk before the rename (so that the
    rename never exposes a file whose data is not on the disk yet, even after a power cut); partial files that a
    killed run left behind are removed when the saver is created. A failed write raises
    :class:`CheckpointWriteError` naming the file.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        for stale in glob.glob(os.path.join(dirname, PARTIAL_PREFIX + "*.pt")):
            with contextlib.suppress(OSError):
                os.remove(stale)
                logger.info(f"removed {stale}, a checkpoint whose writing was interrupted")

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        name = self.filename or filename
        try:
            super().__call__(checkpoint, name, metadata)
        except OSError as e:
            path = os.path.join(self.dirname, name)
            raise CheckpointWriteError(
                e.errno,
                f"cannot write checkpoint {path}: {e.strerror or e}; the previous checkpoint is kept (free some space "
                "or choose a writable --ckpt_dir, then resume)",
            ) from e

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        write_atomic(str(path), lambda f: func(checkpoint, f, **self.kwargs))

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` whose every write is atomic, so that a kill at any moment leaves the
    previous checkpoint readable (MONAI writes in place). Same arguments as ``CheckpointSaver``.

    ``state_dict`` / ``load_state_dict`` carry the best key-metric score so far, so that a resumed run only
    replaces the best model with a better one (put this saver into the training checkpoint to get that)."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(
                    self.save_dir, getattr(checkpoint.save_handler, "filename", None)
                )

    def state_dict(self) -> dict:
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}


def latest_checkpoint(ckpt_dir: str, pattern: str = "checkpoint*.pt") -> str | None:
    """The most recently written full training checkpoint in ``ckpt_dir`` (None if there is none)."""
    files = [f for f in glob.glob(os.path.join(ckpt_dir, pattern)) if os.path.isfile(f)]
    return max(files, key=os.path.getmtime) if files else None


def resume_checkpoint(ckpt_dir: str, resume: bool) -> str | None:
    """The checkpoint to resume from when ``resume`` is set; a clear error when there is none."""
    if not resume:
        return None
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"resume requested but {ckpt_dir} holds no checkpoint*.pt to resume from.")
    try:
        entries = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e}).") from e
    if "critic_stall" not in entries:
        raise ValueError(
            f"{path} was written by bundle <= 0.7 (it has no critic_stall state), which 0.8 cannot resume: start a "
            "new run in another --ckpt_dir. Its model*.pt files still load for evaluation and inference."
        )
    return path
