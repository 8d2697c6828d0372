# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Atomic file writes: a kill or power cut at any moment leaves either the old file or the new one, never a part.

Every writer goes through :func:`write_atomic`: the content is written to a uniquely named temporary file
(``.partial-*``, see :data:`PARTIAL_PREFIX`) in the target's folder, flushed to the disk, renamed over the target
(``os.replace``), and the folder itself is flushed where the operating system allows it, so that the rename
survives a power cut too. :func:`write_text_atomic` and :func:`save_torch_atomic` are the shorthands for text and
``torch.save``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch

__all__ = ["PARTIAL_PREFIX", "save_torch_atomic", "write_atomic", "write_text_atomic"]

# the temporary file of a write in progress; a kill leaves it behind, and cleanups recognise it by this prefix
# (bundle.handlers.checkpoint removes ".partial-*.pt" files; latest_checkpoint never matches them)
PARTIAL_PREFIX = ".partial-"


def _fsync_folder(folder: str) -> None:
    """Flushes ``folder``'s entries (a rename) to the disk; some systems (Windows, some network file systems) refuse
    to open or fsync a folder: the rename is then as durable as they make it."""
    with contextlib.suppress(OSError):
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)


def write_atomic(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through ``write(file)``, ``file`` a binary file open on a temporary ``.partial-*`` file in the
    same folder (same suffix as ``path``), flushed to the disk and then renamed over ``path``. If ``write`` raises, the
    temporary file is removed and ``path`` is left as it was. The new file is readable by group and others, as one
    written by a plain ``open`` would be.

    Raises:
        OSError: the folder is not writable, the disk is full, ...; ``path`` is unchanged.
    """
    folder = os.path.dirname(path) or "."
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); the rename must not publish a file others cannot read
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def write_text_atomic(path: str, text: str, errors: str = "strict") -> None:
    """Writes ``text`` to ``path`` as UTF-8 (``errors`` as for :meth:`str.encode`), atomically (:func:`write_atomic`).
    Newlines are written as given (no translation)."""
    data = text.encode("utf-8", errors)
    write_atomic(path, lambda f: f.write(data))


def save_torch_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(obj, f))
