# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reading any supported 2D image (PNG/JPEG/BMP, DICOM, NIfTI) into one grey channel in [0, 1]."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILReader, PydicomReader
from monai.transforms import LoadImage, MapTransform
from PIL import Image

__all__ = ["BadImageError", "LoadGrayscaleImaged", "load_grayscale", "make_loader", "header_size", "printable_name"]

# Above this many pixels in its 2D plane an image is refused before its pixels are decoded: 50 M pixels are 200 MB
# as float32 (7071 x 7071; radiographs and mammograms have at most about 30 M). The model sees 64 x 64. A volume
# (3D NIfTI, multi-frame DICOM) is read whole and may hold up to 8 * MAX_PIXELS voxels (a 512^3 CT has 134 M).
MAX_PIXELS = 50_000_000
# Below this many pixels on a side an image is refused: it cannot hold anatomy (the model input is 64 x 64).
MIN_SIDE = 8

# ITU-R 601-2 luma, the weights of PIL's convert("L") used by the authors' pipeline
_LUMA = (0.299, 0.587, 0.114)
_PHOTOMETRIC_TAG = "00280004"


def printable_name(name: str) -> str:
    """``name`` as printable UTF-8: bytes of a non-UTF-8 file name (surrogate-escaped by Python) become ``\\udcXX``."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


class BadImageError(ValueError):
    """An input image that cannot be used; the message names the file and what is wrong.

    ``filename`` is the path as given (usable to open the file); the message shows it printable
    (:func:`printable_name`)."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(filename, problem)  # all arguments: pickle and copy.copy rebuild it from ``args``
        self.filename = filename
        self.problem = problem

    def __str__(self) -> str:
        return f"{printable_name(self.filename)}: {printable_name(self.problem)}"


def _reason(error: BaseException) -> str:
    """A one-line reason: MONAI's "cannot find a suitable reader" carries every reader's traceback; keep the last
    line of each (``SomeError: what``)."""
    text = str(error)
    causes = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", text, flags=re.MULTILINE)
    if "Traceback" in text and causes:
        return "; ".join(dict.fromkeys(f"{kind.rsplit('.', 1)[-1]}: {what}" for kind, what in causes))
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def header_size(filename: str) -> tuple[int, ...] | None:
    """The image size from the file header alone, pixels not decoded, 2D plane first: (rows, columns) of PNG/JPEG/BMP
    (PIL), (rows, columns[, frames]) of DICOM (pydicom), the array shape of NIfTI (nibabel; slices along the last
    axis); None when no header reader recognises the file (the full readers then decide).

    Raises:
        BadImageError: PIL refuses the size as a decompression bomb."""
    try:
        with Image.open(filename) as image:
            return tuple(image.size[::-1])
    except Image.DecompressionBombError as e:
        raise BadImageError(filename, f"too many pixels ({e})") from e
    except Exception:
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(filename, stop_before_pixels=True, force=True)  # also files without the preamble
        if "Rows" in ds and "Columns" in ds:
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            return (int(ds.Rows), int(ds.Columns)) + ((frames,) if frames > 1 else ())
    except Exception:
        pass
    try:
        import nibabel

        return tuple(int(s) for s in nibabel.load(filename).shape)
    except Exception:
        return None


def _palette_to_grey(image: Image.Image) -> Image.Image:
    """Palette images hold indices, not intensities: let PIL map them (as the authors' convert("L") does)."""
    return image.convert("L") if image.mode in ("P", "PA") else image


def make_loader() -> LoadImage:
    """The MONAI ``LoadImage`` that :func:`load_grayscale` reads with: DICOM keeping every tag (so that MONOCHROME1 is
    recognised), PNG/JPEG/BMP through PIL (palette images mapped to grey), NIfTI by MONAI's default reader chosen by
    suffix (nibabel). Build one per process and pass it as ``loader`` to read many files."""
    return LoadImage(
        reader=[PydicomReader(prune_metadata=False), PILReader(converter=_palette_to_grey)],
        image_only=True,
        ensure_channel_first=True,
        dtype=None,
    )


def load_grayscale(filename: str, slice_index: int | None = None, loader: LoadImage | None = None) -> MetaTensor:
    """Read one image as a (1, S0, S1) float32 MetaTensor in [0, 1] (MONAI's spatial order, affine kept).

    8-bit images are divided by 255 (as PIL + ToTensor do); anything else (12/16-bit DICOM after
    rescale slope/intercept, float NIfTI) is min-max scaled (a constant image becomes zeros). DICOM MONOCHROME1
    is inverted so that bright means dense. Colour images become grey with the ITU-R 601-2 luma weights.
    A 3D volume is refused unless ``slice_index`` picks a slice along its last axis.

    Images with more than ``MAX_PIXELS`` pixels (by their header, before decoding) or fewer than ``MIN_SIDE`` pixels
    on a side are refused.

    Raises:
        BadImageError: missing file, not a regular file, unreadable or corrupt file, too large or too small, not 2D,
            unsupported channel count, NaN/inf values.
    """
    filename = os.fspath(filename)
    if not os.path.isfile(filename):
        if not os.path.lexists(filename):
            raise BadImageError(filename, "file not found")
        if os.path.islink(filename) and not os.path.exists(filename):
            raise BadImageError(filename, "broken symbolic link (its target is missing, or the link loops)")
        raise BadImageError(filename, "not a regular file (a folder, device or pipe)")
    size = header_size(filename)
    if size is not None and (math.prod(size[:2]) > MAX_PIXELS or math.prod(size) > 8 * MAX_PIXELS):
        plane = math.prod(size[:2])
        raise BadImageError(
            filename,
            f"{' x '.join(map(str, size))} pixels ({plane:,} per image), more than the limit of {MAX_PIXELS:,} per "
            f"image and {8 * MAX_PIXELS:,} per volume (bundle.transforms.io.MAX_PIXELS); downscale it first",
        )
    try:
        img = (loader or make_loader())(filename)
    except Exception as e:  # every reader raises its own error type; the user needs the file and the reason
        raise BadImageError(filename, f"cannot read image ({_reason(e)})") from e
    spatial = tuple(img.shape[1:])
    if len(spatial) == 3:
        if spatial[-1] == 1:
            img = img[..., 0]
        elif slice_index is not None:
            if not -spatial[-1] <= slice_index < spatial[-1]:
                raise BadImageError(filename, f"slice_index {slice_index} outside a volume of {spatial[-1]} slices")
            img = img[..., slice_index]
        else:
            raise BadImageError(
                filename,
                f"is a 3D volume of shape {spatial}; SAGAN works on 2D images: set slice_index to use one slice",
            )
    elif len(spatial) != 2:
        raise BadImageError(filename, f"has {len(spatial)} spatial dimensions {spatial}; a 2D image is needed")
    if min(img.shape[1:]) < MIN_SIDE:
        raise BadImageError(
            filename, f"is {' x '.join(map(str, img.shape[1:]))} pixels, too small (at least {MIN_SIDE} on each side)"
        )
    source_dtype = img.dtype
    img = img.float()
    channels = img.shape[0]
    if channels in (3, 4):
        img = sum(w * img[i : i + 1] for i, w in enumerate(_LUMA))
    elif channels == 2:  # grey + alpha
        img = img[:1]
    elif channels != 1:
        raise BadImageError(filename, f"has {channels} channels; expected grey (1), grey+alpha (2), RGB(A) (3/4)")
    if not torch.isfinite(img).all():
        raise BadImageError(filename, "contains NaN or infinite values")
    if source_dtype == torch.uint8:
        img = img / 255.0
    else:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    tag = img.meta.get(_PHOTOMETRIC_TAG) if isinstance(img, MetaTensor) else None
    if isinstance(tag, Mapping) and "MONOCHROME1" in tag.get("Value", []):
        img = 1.0 - img
    return img


class LoadGrayscaleImaged(MapTransform):
    """Dictionary wrapper of :func:`load_grayscale`: replaces each file name by a (1, S0, S1) image in [0, 1]."""

    def __init__(self, keys: KeysCollection, slice_index: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.slice_index = slice_index
        self.loader = make_loader()

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_grayscale(d[key], self.slice_index, self.loader)
        return d
