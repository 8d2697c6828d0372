# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Conversion of source images to the 8-bit grey PNGs of the Med-AD layout, through the bundle's own reader
(:func:`bundle.transforms.io.load_grayscale`), one file at a time or in batches over a pool of processes."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from monai.transforms import LoadImage
from PIL import Image

from ..transforms.io import BadImageError, load_grayscale, make_loader
from .core import Record

__all__ = ["Converter", "check_dicom", "convert_image"]


def check_dicom(path: str, modalities: Sequence[str] | None = None) -> None:
    """Refuse a DICOM file that is not one 2D image: unreadable header, no pixel data (a structured report, a
    presentation state, ...), a modality outside ``modalities`` (None accepts any), or several frames.

    Raises:
        BadImageError: naming the file and the problem.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")  # the pixel data is not read here
    except InvalidDicomError as e:
        raise BadImageError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # truncated or corrupt header
        raise BadImageError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})") from e
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", str(sop)) if sop else "unknown SOP class"
        raise BadImageError(path, f"has no pixel data: not an image ({kind}, modality {modality or 'not given'})")
    if modalities is not None and modality not in modalities:
        found = f"modality {modality!r}" if modality else "no Modality tag"
        raise BadImageError(
            path, f"has {found}; expected one of {', '.join(modalities)} (--modality any accepts every modality)"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageError(path, f"is a multi-frame DICOM ({frames} frames); one 2D image per file is needed")


def _is_dicom(path: str) -> bool:
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


_LOADER: LoadImage | None = None


def _loader() -> LoadImage:
    """One MONAI LoadImage per process, configured as the bundle's (``bundle.transforms.io``)."""
    global _LOADER
    if _LOADER is None:
        _LOADER = make_loader()
    return _LOADER


def _shrink(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float image in [0, 1] resized (Lanczos, antialiased) so that its short side is ``size``; never
    enlarged; ``size`` 0 keeps it."""
    h, w = image.shape
    if not size or min(h, w) <= size:
        return image
    scale = size / min(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.clip(np.asarray(Image.fromarray(image.astype(np.float32)).resize(shape, Image.Resampling.LANCZOS)), 0, 1)


def convert_image(source: str, dest: str, size: int = 256, modalities: Sequence[str] | None = None) -> tuple[int, int]:
    """Read ``source`` as the bundle does (:func:`bundle.transforms.io.load_grayscale`) and write it to ``dest`` as
    an 8-bit grey PNG whose short side is ``size`` (0: native size). Returns the written (H, W).

    Raises:
        BadImageError: the file is unreadable, not an image, of another modality, constant, or not 2D.
    """
    if _is_dicom(source):
        check_dicom(source, modalities)
    try:
        img = load_grayscale(source, loader=_loader())
    except BadImageError as e:
        if "plugin" in e.problem or "missing dependencies" in e.problem:  # compressed DICOM without a decoder
            raise BadImageError(
                source, e.problem + " (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg adds decoders)"
            ) from e
        raise
    image = img[0].numpy().T  # load_grayscale gives MONAI's (x, y) order: back to (rows, columns)
    if image.max() <= image.min():
        raise BadImageError(source, "is a constant image (every pixel has the same value)")
    image = _shrink(image, size)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    Image.fromarray(np.round(image * 255.0).astype(np.uint8)).save(dest, format="PNG")
    return image.shape


def _convert_job(job: tuple[str, str, int, tuple[str, ...] | None]) -> tuple[str | None, tuple[int, int] | None]:
    source, dest, size, modalities = job
    try:
        return None, convert_image(source, dest, size, modalities)
    except BadImageError as e:
        return e.problem, None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


class Converter:
    """Decodes batches of records, in order, to the PNG files ``destination(record.name)``, with ``workers``
    processes (1: in this process). A context manager: leaving it shuts the processes down."""

    def __init__(
        self, destination: Callable[[str], str], size: int, modalities: Sequence[str] | None, workers: int
    ) -> None:
        self.destination, self.size = destination, size
        self.modalities = tuple(modalities) if modalities is not None else None
        self.pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)

    def __call__(self, records: list[Record]) -> list[str | None]:
        """The problem of each record (None: converted)."""
        jobs = []
        for r in records:
            if not os.path.isfile(r.source):
                jobs.append(None)
            else:
                jobs.append((r.source, self.destination(r.name), self.size, self.modalities))
        todo = [j for j in jobs if j is not None]
        done = iter(self.pool.map(_convert_job, todo, chunksize=4) if self.pool else map(_convert_job, todo))
        return ["file not found" if j is None else next(done)[0] for j in jobs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __enter__(self) -> Converter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
