# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""What the SAGAN app adds to MONAI Label 0.8.5's server around its requests: quieter logs, a writer warmed up at
start-up, train options checked when the request arrives, and the uploaded file's name for error messages.

MONAI Label offers no hook between an HTTP request and its background training process, nor passes an uploaded
file's name to the app: :func:`install_request_hooks` wraps the two module-level functions involved
(``AsyncTask.run`` and ``monailabel.endpoints.infer.run_inference``); the wrappers ask the current app instance
(``app_instance()``) at each call, so installing them twice, or for several app instances (tests), is harmless.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["UPLOAD_NAME", "install_log_filters", "install_request_hooks", "warm_up_writer"]

logger = logging.getLogger(__name__)

# The uploaded file's name (``POST /infer/{model}`` with a ``file`` part) while that request runs; None otherwise.
UPLOAD_NAME: contextvars.ContextVar[str | None] = contextvars.ContextVar("sagan_upload_name", default=None)


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``; with ``once`` the first such record passes."""

    def __init__(self, prefixes: tuple[str, ...], once: bool = False) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.once = once
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefixes):
            return True
        if self.once and not self.seen:
            self.seen = True
            return True
        return False


def install_log_filters() -> None:
    """Silences log lines that say nothing to a SAGAN server's user:

    - MONAI's ``nvImageCodec is not available; skipping pydicom decoder plugin registration.``, logged each time a
      MONAI DICOM reader is built (every request that reads DICOM through MONAI): logged once per process;
    - MONAI Label's ``Model: ...; Label: restored image => 0``: the bundle metadata's output channel, which the app
      replaces by its label ``anomaly`` (1); the app logs its own line instead.
    """
    for name, prefixes, once in (
        ("monai.data.nvimgcodec_pydicom_plugin", ("nvImageCodec is not available",), True),
        ("monailabel.tasks.infer.bundle", ("Model: ",), False),
    ):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in target.filters):
            target.addFilter(_DropMessages(prefixes, once))


def warm_up_writer() -> float:
    """Runs MONAI Label's result writer once on a tiny label (a 2D PNG and a NIfTI volume with an affine), so that
    ITK's lazily loaded modules (4-5 s on a CPU) are loaded at start-up instead of during the first ``/infer``
    request. Returns the seconds it took; a failure is logged, never raised (the first request then pays)."""
    start = time.perf_counter()
    try:
        from monailabel.transform.writer import write_itk

        with tempfile.TemporaryDirectory(prefix="sagan-warmup-") as folder:
            label = np.zeros((8, 8), np.uint8)
            write_itk(label, os.path.join(folder, "warmup.png"), None, np.uint8, False)
            write_itk(label[..., None], os.path.join(folder, "warmup.nii.gz"), np.eye(4), np.uint8, True)
    except Exception as e:  # a missing ITK module must not stop the server
        logger.warning(f"result writer warm-up failed ({type(e).__name__}: {e}); the first /infer loads it")
    seconds = time.perf_counter() - start
    logger.info(f"result writer (ITK) warmed up in {seconds:.1f} s")
    return seconds


def _train_checker() -> Callable[[str, dict[str, Any]], None] | None:
    from monailabel.interfaces.utils.app import app_instance

    return getattr(app_instance(), "check_train_request", None)


def install_request_hooks() -> None:
    """Wraps MONAI Label's ``AsyncTask.run`` (every ``POST /train/...``) so that the app's ``check_train_request``
    refuses bad options with HTTP 422 before a background training starts, and ``run_inference`` (``POST
    /infer/...``) so that the app can name an uploaded file by its own name (:data:`UPLOAD_NAME`)."""
    import monailabel.endpoints.infer as infer_endpoint
    from monailabel.utils.async_tasks.task import AsyncTask

    run = AsyncTask.run
    if not getattr(run, "_sagan_hook", False):

        @functools.wraps(run)
        def checked_run(method: str, request=None, params=None, force_sync=False, enqueue=False):
            if method == "train":
                check = _train_checker()
                options = {**(request or {}), **(params or {})}  # as AsyncTask.run merges them
                if check is not None and options.get("model"):
                    check(str(options["model"]), options)
            return run(method, request=request, params=params, force_sync=force_sync, enqueue=enqueue)

        checked_run._sagan_hook = True  # type: ignore[attr-defined]
        AsyncTask.run = staticmethod(checked_run)  # type: ignore[method-assign]

    # MONAI Label unloads lib/ whenever it loads an app (monailabel.utils.others.class_utils.module_from_file): an
    # app started again in the same process has a new lib.server and UPLOAD_NAME, whose hook replaces the old one
    run_inference = infer_endpoint.run_inference
    if getattr(run_inference, "_sagan_hook", None) is not UPLOAD_NAME:
        original = run_inference.__wrapped__ if getattr(run_inference, "_sagan_hook", None) else run_inference

        @functools.wraps(original)
        def named_run_inference(background_tasks, model, image, session_id, params, file, label, output):
            token = UPLOAD_NAME.set(file.filename if file is not None and file.filename else None)
            try:
                return original(background_tasks, model, image, session_id, params, file, label, output)
            finally:
                UPLOAD_NAME.reset(token)

        named_run_inference._sagan_hook = UPLOAD_NAME  # type: ignore[attr-defined]
        infer_endpoint.run_inference = named_run_inference
