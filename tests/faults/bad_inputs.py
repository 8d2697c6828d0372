# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Bad inputs generated in bulk, and how the bundle's entry points take each one.

Every :class:`Case` writes its input into a fresh folder and says what should happen: ``refuse`` (raise
``BadImageError`` / ``DatalistError`` whose message names the file and matches ``message``), ``accept`` (return a
result that ``check`` finds right) or ``warn`` (accept, and log a warning matching ``message``). :func:`run_case`
feeds the input to the entry point (``bundle.transforms.io.load_grayscale``, an ``ImageCache`` with the training
preprocessing, or ``bundle.data.load_medad_datalist``) and classifies what happened:

- ``refused``: refused with a clear message (names the file, says what is wrong, printable as UTF-8);
- ``accepted``: accepted, and the result is right (or the expected warning was logged);
- ``crashed``: any other exception, or a refusal whose message is unclear;
- ``silent``: accepted although it should have been refused, or accepted with a wrong result.

Used by ``tests/faults/test_bad_inputs.py`` (the light cases) and ``scripts/fault_suite.py`` (all, including the
``heavy`` ones: real 12000^2 and 20000^2 images and a real 100 MB data.json, each in a memory-limited process).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from PIL import Image

from ..dicom_files import make_dicom

OUTCOMES = ("refused", "accepted", "crashed", "silent")


@dataclass
class Case:
    """One bad input. ``make(folder) -> path`` writes it (an image file, or a data set folder for ``datalist``)."""

    name: str
    make: Callable[[str], str]
    expect: str  # "refuse", "accept" or "warn"
    message: str = ""  # regex the refusal (or warning) must match
    entry: str = "image"  # "image": load_grayscale; "cache": ImageCache + preprocessing; "datalist"
    check: Callable[[torch.Tensor], bool] | None = None  # for accepted images: is the result right?
    heavy: bool = False  # slow or memory-hungry: only scripts/fault_suite.py runs it


# ----------------------------------------------------------------------------------------------- writers


def _grey(h: int = 40, w: int = 30) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 251).astype(np.uint8)


def _png(path: str, array: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(array, mode=mode).save(path, format="PNG")
    return path


def _jpeg(path: str, array: np.ndarray) -> str:
    Image.fromarray(array).save(path, format="JPEG", quality=95)
    return path


def _nifti(path: str, array: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def _truncate(path: str, fraction: float = 0.5) -> str:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path: str, width: int, height: int) -> str:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels, with one tiny (short) data chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return _write(path, data)


def _png_large(path: str, side: int) -> str:
    """A real ``side`` x ``side`` 8-bit PNG (all zeros, a few hundred kB), written row by row without the array."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    return _write(path, png)


def _nifti_large(path: str, side: int) -> str:
    """A real ``side`` x ``side`` uint8 NIfTI (.nii.gz of zeros), streamed: header then compressed zero rows."""
    header = nib.Nifti1Header()
    header.set_data_shape((side, side))
    header.set_data_dtype(np.uint8)
    header.set_sform(np.eye(4), code=1)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\x00" * (352 - len(header.binaryblock)))
        row = b"\x00" * side
        for _ in range(side):
            f.write(row)
    return path


def _dataset(folder: str, data: object | bytes) -> str:
    """A Med-AD folder: ``data.json`` (``data`` as JSON, or raw bytes) and ``images/`` holding the 16x16 PNGs
    ``n0..n5.png`` and ``a0..a3.png`` that :func:`_good_list` names."""
    root = os.path.join(folder, "set")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for name in [f"n{i}.png" for i in range(6)] + [f"a{i}.png" for i in range(4)]:
        _png(os.path.join(root, "images", name), _grey(16, 16))
    _write(os.path.join(root, "data.json"), data if isinstance(data, bytes) else json.dumps(data).encode())
    return root


def _good_list(**changes: object) -> dict:
    """A valid data.json (every image in one place) with ``changes``: ``test__1=[...]`` replaces ``test/1``."""
    data: dict = {
        "train": {"0": ["n0.png", "n1.png"], "unlabeled": {"0": ["n2.png"], "1": ["a0.png"]}},
        "val": {"0": ["n3.png"], "1": ["a1.png"]},
        "test": {"0": ["n4.png"], "1": ["a2.png"]},
    }
    for key, value in changes.items():
        *path, last = key.split("__")
        node = data
        for part in path:
            node = node[part]
        node[last] = value
    return data


# ----------------------------------------------------------------------------------------------- checks


def _equals(expected: np.ndarray, atol: float = 1e-6) -> Callable[[torch.Tensor], bool]:
    """Result (1, W, H) in MONAI's order equals ``expected`` (H, W) in [0, 1]."""

    def check(x: torch.Tensor) -> bool:
        x = torch.as_tensor(x).as_subclass(torch.Tensor)
        return tuple(x.shape) == (1,) + expected.shape[::-1] and bool(
            torch.allclose(x[0].T.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol)
        )

    return check


def _preprocessed(x: torch.Tensor) -> bool:
    x = torch.as_tensor(x).as_subclass(torch.Tensor)
    return tuple(x.shape) == (1, 64, 64) and bool(torch.isfinite(x).all()) and float(x.min()) >= -1 - 1e-6


GREY = _grey()
RGBA = np.dstack([GREY, 255 - GREY, (GREY // 2), np.full_like(GREY, 7)])
LUMA = (0.299 * RGBA[..., 0] + 0.587 * RGBA[..., 1] + 0.114 * RGBA[..., 2]) / 255.0
WIDE = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)  # 16-bit, 0..59950
RAMP12 = (np.arange(40 * 30).reshape(40, 30) * 4095 // (40 * 30 - 1)).astype(np.uint16)
NON_UTF8 = os.fsdecode(b"scan_\xff\xfe.png")  # a file name that is not UTF-8 (surrogate-escaped in Python)


def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def _symlink(target: str, link: str) -> str:
    os.symlink(target, link)
    return link


def _fifo(path: str) -> str:
    os.mkfifo(path)
    return path


def cases() -> list[Case]:
    """Every case; ``heavy`` ones need seconds, up to about 500 MB of disk writes and a few GB of memory."""
    j = os.path.join
    return [
        # truncated and empty files
        Case("truncated PNG", lambda d: _truncate(_png(j(d, "t.png"), _grey(64, 64))), "refuse", "cannot read"),
        Case("truncated JPEG", lambda d: _truncate(_jpeg(j(d, "t.jpg"), _grey(64, 64))), "refuse", "cannot read"),
        Case("truncated DICOM", lambda d: _truncate(make_dicom(j(d, "t.dcm"), RAMP12)), "refuse", "cannot read"),
        Case("truncated NIfTI", lambda d: _truncate(_nifti(j(d, "t.nii"), GREY.astype(np.float32))), "refuse", ""),
        Case("zero-byte PNG", lambda d: _write(j(d, "z.png"), b""), "refuse", "cannot read"),
        Case("zero-byte JPEG", lambda d: _write(j(d, "z.jpg"), b""), "refuse", "cannot read"),
        Case("zero-byte DICOM", lambda d: _write(j(d, "z.dcm"), b""), "refuse", "cannot read"),
        Case("zero-byte NIfTI", lambda d: _write(j(d, "z.nii.gz"), b""), "refuse", "cannot read"),
        Case("text file named .png", lambda d: _write(j(d, "notes.png"), b"hello\n" * 20), "refuse", "cannot read"),
        # wrong extensions
        Case("PNG named .jpg", lambda d: _png(j(d, "p.jpg"), GREY), "accept", check=_equals(GREY / 255.0)),
        Case("JPEG named .png", lambda d: _jpeg(j(d, "j.png"), GREY), "accept", check=_equals(GREY / 255, 0.05)),
        Case("PNG named .dcm", lambda d: _png(j(d, "p.dcm"), GREY), "accept", check=_equals(GREY / 255.0)),
        Case("DICOM named .png", lambda d: make_dicom(j(d, "d.png"), RAMP12), "accept", check=_equals(_minmax(RAMP12))),
        Case("image with no suffix", lambda d: _png(j(d, "noext"), GREY), "accept", check=_equals(GREY / 255.0)),
        # unusual but valid pixel formats
        Case("RGBA PNG", lambda d: _png(j(d, "rgba.png"), RGBA, "RGBA"), "accept", check=_equals(LUMA, 1e-5)),
        Case("16-bit PNG", lambda d: _png(j(d, "w.png"), WIDE), "accept", check=_equals(_minmax(WIDE), 1e-6)),
        Case(
            "DICOM MONOCHROME1",
            lambda d: make_dicom(j(d, "m1.dcm"), RAMP12, "MONOCHROME1"),
            "accept",
            check=_equals(1 - _minmax(RAMP12), 1e-6),
        ),
        Case(
            "NIfTI with NaN",
            lambda d: _nifti(j(d, "nan.nii.gz"), np.where(GREY > 100, np.nan, GREY).astype(np.float32)),
            "refuse",
            "NaN or infinite",
        ),
        Case(
            "NIfTI with Inf",
            lambda d: _nifti(j(d, "inf.nii.gz"), np.where(GREY > 100, np.inf, GREY).astype(np.float32)),
            "refuse",
            "NaN or infinite",
        ),
        Case(
            "3D volume",
            lambda d: _nifti(j(d, "vol.nii.gz"), np.random.rand(30, 40, 5).astype(np.float32)),
            "refuse",
            "3D volume",
        ),
        Case(
            "4D volume",
            lambda d: _nifti(j(d, "v4.nii.gz"), np.random.rand(8, 8, 2, 3).astype(np.float32)),
            "refuse",
            "dimensions|channels|3D",
        ),
        Case(
            "constant image",
            lambda d: _png(j(d, "flat.png"), np.full((32, 32), 9, np.uint8)),
            "accept",
            check=_equals(np.full((32, 32), 9 / 255)),
        ),
        # sizes
        Case("1x1 PNG", lambda d: _png(j(d, "one.png"), np.full((1, 1), 200, np.uint8)), "refuse", "too small"),
        Case(
            "1x1 PNG through preprocessing",
            lambda d: _png(j(d, "one.png"), np.full((1, 1), 200, np.uint8)),
            "refuse",
            "too small",
            entry="cache",
        ),
        Case(
            "PNG header claiming 20000x20000",
            lambda d: _png_header_only(j(d, "huge.png"), 20000, 20000),
            "refuse",
            "pixels|decompression bomb",
        ),
        Case(
            "PNG header claiming 10000x10000",
            lambda d: _png_header_only(j(d, "big.png"), 10000, 10000),
            "refuse",
            "pixels",
        ),
        Case("real 12000x12000 PNG", lambda d: _png_large(j(d, "big.png"), 12000), "refuse", "pixels", heavy=True),
        Case(
            "real 20000x20000 PNG", lambda d: _png_large(j(d, "huge.png"), 20000), "refuse", "pixels|bomb", heavy=True
        ),
        Case(
            "real 20000x20000 NIfTI", lambda d: _nifti_large(j(d, "huge.nii.gz"), 20000), "refuse", "pixels", heavy=True
        ),
        # names and file system oddities
        Case("non-UTF-8 file name", lambda d: _png(j(d, NON_UTF8), GREY), "accept", check=_equals(GREY / 255.0)),
        Case("non-UTF-8 name, bad file", lambda d: _write(j(d, NON_UTF8), b"junk"), "refuse", "cannot read"),
        Case(
            "symlink to a good image",
            lambda d: _symlink(_png(j(d, "real.png"), GREY), j(d, "link.png")),
            "accept",
            check=_equals(GREY / 255.0),
        ),
        Case(
            "dangling symlink",
            lambda d: _symlink(j(d, "gone.png"), j(d, "dangling.png")),
            "refuse",
            "not found|not a regular file|broken symbolic link",
        ),
        Case(
            "symlink loop",
            lambda d: _symlink(j(d, "loop.png"), j(d, "loop.png")),
            "refuse",
            "not found|not a regular file|broken symbolic link",
        ),
        Case(
            "symlink to /dev/zero",
            lambda d: _symlink("/dev/zero", j(d, "zero.png")),
            "refuse",
            "not found|not a regular file|broken symbolic link",
        ),
        Case(
            "folder named .png",
            lambda d: (os.mkdir(j(d, "dir.png")), j(d, "dir.png"))[1],
            "refuse",
            "not found|not a regular file|broken symbolic link",
        ),
        Case(
            "FIFO named .png",
            lambda d: _fifo(j(d, "pipe.png")),
            "refuse",
            "not found|not a regular file|broken symbolic link",
        ),
        # data.json
        Case(
            "data.json: duplicate entry in a list",
            lambda d: _dataset(d, _good_list(test__1=["a2.png", "a2.png"])),
            "refuse",
            "more than once",
            entry="datalist",
        ),
        Case(
            "data.json: same image under both test labels",
            lambda d: _dataset(d, _good_list(test__1=["a2.png", "n4.png"])),
            "refuse",
            "both 'test/0' and 'test/1'",
            entry="datalist",
        ),
        Case(
            "data.json: same image in val and test",
            lambda d: _dataset(d, _good_list(val__0=["n4.png"])),
            "refuse",
            "both 'val/0' and 'test/0'",
            entry="datalist",
        ),
        Case(
            "data.json: test image also in training",
            lambda d: _dataset(d, _good_list(test__0=["n0.png"])),
            "warn",
            "optimistic",
            entry="datalist",
        ),
        Case(
            "data.json: ../../etc/passwd",
            lambda d: _dataset(d, _good_list(test__1=["../../etc/passwd"])),
            "refuse",
            "outside images/",
            entry="datalist",
        ),
        Case(
            "data.json: absolute path",
            lambda d: _dataset(d, _good_list(train__0=["n0.png", "/etc/passwd"])),
            "refuse",
            "outside images/",
            entry="datalist",
        ),
        Case(
            "data.json: sub/../../ escape",
            lambda d: _dataset(d, _good_list(val__1=["n/../../a1.png"])),
            "refuse",
            "outside images/",
            entry="datalist",
        ),
        Case(
            "data.json: NUL in a name",
            lambda d: _dataset(d, _good_list(val__1=["a1.png\x00.png"])),
            "refuse",
            "NUL",
            entry="datalist",
        ),
        Case("data.json: symlinked image", lambda d: _dataset_with_symlink(d), "accept", entry="datalist"),
        Case(
            "data.json: dangling symlinked image",
            lambda d: _dataset_with_symlink(d, dangling=True),
            "refuse",
            "not found",
            entry="datalist",
        ),
        Case(
            "data.json: non-UTF-8 bytes",
            lambda d: _dataset(d, b'{"train": {"0": ["\xff.png"]}}'),
            "refuse",
            "not valid JSON",
            entry="datalist",
        ),
        Case("data.json: empty file", lambda d: _dataset(d, b""), "refuse", "not valid JSON", entry="datalist"),
        Case(
            "data.json: nested 100000 deep",
            lambda d: _dataset(d, b"[" * 100000 + b"]" * 100000),
            "refuse",
            "not valid JSON",
            entry="datalist",
        ),
        Case(
            "data.json: 100 MB (sparse)", lambda d: _sparse_datalist(d, 100 * 2**20), "refuse", "MiB", entry="datalist"
        ),
        Case(
            "data.json: 100 MB of real JSON",
            lambda d: _big_datalist(d, 100 * 2**20),
            "refuse",
            "MiB",
            entry="datalist",
            heavy=True,
        ),
        Case(
            "data.json: list is a string",
            lambda d: _dataset(d, _good_list(train__0="n0.png")),
            "refuse",
            "list of file names",
            entry="datalist",
        ),
        Case(
            "data.json: missing image",
            lambda d: _dataset(d, _good_list(test__1=["a2.png", "nope.png"])),
            "refuse",
            "not found",
            entry="datalist",
        ),
    ]


def _dataset_with_symlink(folder: str, dangling: bool = False) -> str:
    root = _dataset(folder, _good_list(test__1=["a2.png", "linked.png"]))
    target = os.path.join(folder, "elsewhere.png")
    if not dangling:
        _png(target, GREY)
    os.symlink(target, os.path.join(root, "images", "linked.png"))
    return root


def _sparse_datalist(folder: str, size: int) -> str:
    root = _dataset(folder, _good_list())
    with open(os.path.join(root, "data.json"), "r+b") as f:
        f.truncate(size)
    return root


def _big_datalist(folder: str, size: int) -> str:
    names = [f"img_{i:09d}.png" for i in range(size // 17)]
    return _dataset(folder, {"train": {"0": names}})


# ----------------------------------------------------------------------------------------------- running


def _preprocessing():
    from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRanged

    from bundle.transforms import LoadGrayscaleImaged

    return Compose(
        [
            LoadGrayscaleImaged("image"),
            Resized("image", (64, 64), mode="bilinear", anti_aliasing=True),
            ScaleIntensityRanged("image", 0.0, 1.0, -1.0, 1.0),
            EnsureTyped("image", data_type="tensor", track_meta=False),
        ]
    )


def _clear(message: str, path: str, pattern: str) -> bool:
    """Names the file (its base name, or the data.json of a folder), matches the case's pattern, prints as UTF-8."""
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return False
    base = os.path.basename(path.rstrip("/"))
    named = base in message or repr(base)[1:-1] in message or (os.path.isdir(path) and "data.json" in message)
    return named and re.search(pattern, message, re.IGNORECASE | re.DOTALL) is not None


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_case(case: Case, folder: str, path: str | None = None) -> tuple[str, str]:
    """Writes the case into ``folder`` (unless ``path`` says where ``case.make`` already wrote it) and runs it:
    ``(outcome, detail)`` with ``outcome`` one of ``OUTCOMES``."""
    from bundle.data import DatalistError, ImageCache, load_medad_datalist
    from bundle.transforms.io import BadImageError, load_grayscale

    if path is None:
        os.makedirs(folder, exist_ok=True)
        path = case.make(folder)
    capture = _Capture()
    logging.getLogger("bundle").addHandler(capture)
    try:
        if case.entry == "datalist":
            result = load_medad_datalist(path)
        elif case.entry == "cache":
            result = ImageCache([{"image": path}], _preprocessing())[0]["image"]
        else:
            result = load_grayscale(path)
    except (BadImageError, DatalistError) as e:
        message = str(e)
        if case.expect != "refuse":
            return "crashed", f"refused a valid input: {message[:300]}"
        if not _clear(message, path, case.message):
            return "crashed", f"unclear message: {message[:300]!a}"
        return "refused", message.splitlines()[0][:300]
    except Exception as e:  # anything else is a crash as far as the user is concerned
        return "crashed", f"{type(e).__name__}: {str(e)[:300]!a}"
    finally:
        logging.getLogger("bundle").removeHandler(capture)
    if case.expect == "refuse":
        return "silent", "accepted; should have been refused"
    if case.expect == "warn":
        hits = [m for m in capture.messages if re.search(case.message, m)]
        return ("accepted", hits[0][:300]) if hits else ("silent", "accepted without the expected warning")
    if case.entry == "datalist":
        return "accepted", "parsed"
    right = case.check(result) if case.check is not None else _preprocessed(result)
    return ("accepted", "values checked") if right else ("silent", "accepted with wrong values")
