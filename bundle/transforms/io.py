# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Reading any supported 2D image (PNG/JPEG/BMP, DICOM, NIfTI), or one slice of a 3D volume (NIfTI, or a folder
holding a DICOM series: :func:`find_dicom_series`, :func:`read_dicom_series`), into one grey channel in [0, 1]."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILReader, PydicomReader
from monai.transforms import LoadImage, MapTransform
from PIL import Image

__all__ = [
    "BadImageError",
    "DicomSeries",
    "LoadGrayscaleImaged",
    "SLICE_AXIS_KEY",
    "SLICE_INDEX_KEY",
    "header_size",
    "load_grayscale",
    "load_grayscale_slice",
    "dicom_series_under",
    "find_dicom_series",
    "make_loader",
    "printable_name",
    "read_dicom_series",
    "read_volume",
    "volume_slice",
]

logger = logging.getLogger(__name__)

# Above this many pixels in its 2D plane an image is refused before its pixels are decoded: 50 M pixels are 200 MB
# as float32 (7071 x 7071; radiographs and mammograms have at most about 30 M). The model sees 64 x 64. A volume
# (3D NIfTI, multi-frame DICOM) is read whole and may hold up to 8 * MAX_PIXELS voxels (a 512^3 CT has 134 M).
MAX_PIXELS = 50_000_000
# Below this many pixels on a side an image is refused: it cannot hold anatomy (the model input is 64 x 64).
MIN_SIDE = 8

# ITU-R 601-2 luma, the weights of PIL's convert("L") used by the authors' pipeline
_LUMA = (0.299, 0.587, 0.114)
_PHOTOMETRIC_TAG = "00280004"

# A data item asking for one slice of a volume carries these keys (bundle.volumes.expand_volumes); the loaded image's
# metadata then carries them too, as (1,) int64 arrays (arrays, so that collate_mixed_meta keeps them in a batch
# beside 2D images that lack them), and marks the image as a slice of the volume named by its filename_or_obj.
SLICE_INDEX_KEY = "slice_index"
SLICE_AXIS_KEY = "slice_axis"


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


def _read_checked(filename: str, loader: LoadImage | None) -> MetaTensor:
    """The file as MONAI reads it, (C, *spatial), after the checks that need no pixels (exists, regular file, size by
    its header). Raises BadImageError."""
    filename = os.fspath(filename)
    if os.path.isdir(filename):
        series = find_dicom_series(filename)
        if series is not None:
            return read_dicom_series(series, loader)
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
        return (loader or make_loader())(filename)
    except Exception as e:  # every reader raises its own error type; the user needs the file and the reason
        raise BadImageError(filename, f"cannot read image ({_reason(e)})") from e


def _to_grey(img: MetaTensor, filename: str) -> MetaTensor:
    """A (C, S0, S1) image as (1, S0, S1) float32 in [0, 1] (see :func:`load_grayscale`). Raises BadImageError."""
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
    img = _read_checked(filename, loader)
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
    return _to_grey(img, filename)


# the last volume read_volume decoded, by (real path, modification time, size): the slices of a volume are loaded
# one after the other, and a volume decoded once per slice would cost its whole size per slice
_last_volume: tuple[tuple[str, int, int], MetaTensor] | None = None
# guards _last_volume; hold it (re-entrant) around reading all the slices of one volume so that no other thread
# replaces the kept volume in between (ImageCache at start-up, MONAI Label requests in threads)
VOLUME_LOCK = threading.RLock()


def read_volume(filename: str, loader: LoadImage | None = None) -> MetaTensor:
    """A file as MONAI reads it, (C, *spatial) with its metadata, decoded once for consecutive calls on the same
    (unchanged) file: this process keeps the last file read. The result is shared: do not change it in place.

    Raises:
        BadImageError: as :func:`load_grayscale` for a file that cannot be read."""
    global _last_volume
    filename = os.fspath(filename)
    try:
        stat = os.stat(filename)
        key = (os.path.realpath(filename), stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = None  # _read_checked names the problem
    if key is None:
        return _read_checked(filename, loader)
    with VOLUME_LOCK:
        if _last_volume is None or _last_volume[0] != key:
            _last_volume = (key, _read_checked(filename, loader))
        return _last_volume[1]


def load_grayscale_slice(
    filename: str, slice_index: int, slice_axis: int = -1, loader: LoadImage | None = None
) -> MetaTensor:
    """Slice ``slice_index`` along spatial axis ``slice_axis`` (0, 1, 2 or -3..-1) of a 3D volume as a (1, A, B)
    float32 MetaTensor in [0, 1], (A, B) the volume's other two spatial axes in their order, grey and scaled as by
    :func:`load_grayscale` (min-max over the slice: along the last axis, the same image as ``load_grayscale(filename,
    slice_index)``). Its metadata is the volume's (``spatial_shape`` the volume's, ``original_affine`` its file's)
    plus :data:`SLICE_INDEX_KEY` and :data:`SLICE_AXIS_KEY` ((1,) int64 arrays, non-negative). The volume is decoded
    once for consecutive slices of one file (:func:`read_volume`).

    Raises:
        BadImageError: as :func:`load_grayscale`; not a 3D volume; ``slice_axis`` or ``slice_index`` out of range.
    """
    filename = os.fspath(filename)
    volume = read_volume(filename, loader)
    spatial = tuple(volume.shape[1:])
    if len(spatial) != 3:
        raise BadImageError(filename, f"has spatial shape {spatial}; a slice can only be taken of a 3D volume")
    if not -3 <= slice_axis < 3:
        raise BadImageError(filename, f"slice_axis {slice_axis} is not an axis of a 3D volume (0, 1, 2 or -3..-1)")
    axis = slice_axis % 3
    if not -spatial[axis] <= slice_index < spatial[axis]:
        raise BadImageError(
            filename, f"slice_index {slice_index} outside a volume of {spatial[axis]} slices along axis {axis}"
        )
    index = slice_index % spatial[axis]
    img = volume[(slice(None),) * (1 + axis) + (index,)]
    img.meta = copy.deepcopy(volume.meta)  # the slices of the cached volume must not share (mutable) metadata
    img.meta[SLICE_INDEX_KEY] = np.array([index], np.int64)
    img.meta[SLICE_AXIS_KEY] = np.array([axis], np.int64)
    return _to_grey(img, filename)


def volume_slice(meta: Mapping | None) -> tuple[int, int] | None:
    """``(slice_axis, slice_index)`` of an image loaded as one slice of a volume by :func:`load_grayscale_slice`
    (from its metadata, after :class:`~bundle.transforms.DecodeMixedMetad` where it went through a mixed batch), or
    None for any other image (2D images, and the model's own ``slice_index``)."""
    if not meta or SLICE_INDEX_KEY not in meta or SLICE_AXIS_KEY not in meta:
        return None
    index, axis = meta[SLICE_INDEX_KEY], meta[SLICE_AXIS_KEY]
    if isinstance(index, str) or isinstance(axis, str):
        raise ValueError("volume_slice: the metadata is still encoded; apply DecodeMixedMetad first.")
    return int(np.asarray(axis).reshape(-1)[0]), int(np.asarray(index).reshape(-1)[0])


class LoadGrayscaleImaged(MapTransform):
    """Dictionary wrapper of :func:`load_grayscale`: replaces each file name by a (1, S0, S1) image in [0, 1].

    An item that carries :data:`SLICE_INDEX_KEY` (and optionally :data:`SLICE_AXIS_KEY`, default -1: the last axis),
    as :func:`bundle.volumes.expand_volumes` makes them, gets that slice of its volume instead
    (:func:`load_grayscale_slice`, whose image metadata records the slice); the two keys are taken out of the item
    (a batch may hold items without them). Other items are read with ``slice_index``, the model's slice of 3D inputs.
    """

    def __init__(self, keys: KeysCollection, slice_index: int | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.slice_index = slice_index
        self.loader = make_loader()

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        item_slice = d.pop(SLICE_INDEX_KEY, None)
        item_axis = d.pop(SLICE_AXIS_KEY, -1)
        for key in self.key_iterator(d):
            if item_slice is None:
                d[key] = load_grayscale(d[key], self.slice_index, self.loader)
            else:
                d[key] = load_grayscale_slice(d[key], int(item_slice), int(item_axis), self.loader)
        return d


# ---- DICOM series: a folder of single-frame instances of one series read as one 3D volume -------------------------

DICOM_SUFFIXES = (".dcm", ".dicom")
# files with these suffixes are never opened as DICOM when a folder is searched for a series
_OTHER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".gz", ".json", ".csv", ".txt")
_POSITION_TOLERANCE = 1e-3  # mm: two instances closer than this along the slice normal are at the same position
_SPACING_TOLERANCE = 0.01  # share of the mean slice step that the steps may differ by before a warning


@dataclass(frozen=True)
class DicomSeries:
    """The instances of one DICOM series in one folder, in the order of their position along the slice normal.

    Attributes:
        folder: the folder (normalised path): the series' name, the ``image`` of its data item and the
            ``filename_or_obj`` of the volume read from it.
        series_uid: its SeriesInstanceUID.
        files: (N,) its instance files, sorted by ImagePositionPatient projected on the normal of
            ImageOrientationPatient (ascending): slice k of the volume is ``files[k]``.
        sop_instance_uids: (N,) their SOPInstanceUIDs, in the same order.
        rows, columns: every instance's Rows and Columns.
        affine: (4, 4) float64 voxel -> RAS mm of the volume (MONAI's convention, as its PydicomReader gives for one
            file: array axis 0 along the columns of the image (the row direction), axis 1 along its rows, axis 2
            the slices ``files`` in order; origin the first slice's ImagePositionPatient).
    """

    folder: str
    series_uid: str
    files: tuple[str, ...]
    sop_instance_uids: tuple[str, ...]
    rows: int
    columns: int
    affine: np.ndarray

    @property
    def depth(self) -> int:
        """N, the number of slices (instances)."""
        return len(self.files)


def _dicom_candidates(folder: str) -> list[str]:
    """The files of ``folder`` (not below it) that may be DICOM instances: a DICOM suffix, or a suffix that names no
    other format and the DICM preamble (scanners and PACS exports often write names without a suffix)."""
    import pydicom

    found = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        lower = name.lower()
        if name.startswith(".") or lower == "dicomdir" or lower.endswith(_OTHER_SUFFIXES) or not os.path.isfile(path):
            continue
        if lower.endswith(DICOM_SUFFIXES):
            found.append(path)
            continue
        try:
            if pydicom.misc.is_dicom(path):
                found.append(path)
        except OSError:
            continue
    return found


def _series_problem(headers: list) -> str | None:
    """Why the headers of one series' instances (two or more) do not make a volume, or None when they do."""
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in headers):
        return "it holds multi-frame instances"
    if len({(int(ds.Rows), int(ds.Columns)) for ds in headers}) > 1:
        return "its instances have different Rows x Columns"
    if any("PixelSpacing" not in ds for ds in headers):
        return "an instance lacks PixelSpacing"
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in headers])
    if orientations.shape[1] != 6 or not np.allclose(orientations, orientations[0], atol=1e-4):
        return "its instances have different ImageOrientationPatient"
    spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in headers])
    if not np.allclose(spacings, spacings[0], rtol=1e-4):
        return "its instances have different PixelSpacing"
    return None


def _make_series(folder: str, uid: str, members: list[tuple[str, object]]) -> DicomSeries | str:
    """The :class:`DicomSeries` of one series' ``(file, header)`` pairs (two or more, each with position and
    orientation), or a string saying why they are not a volume."""
    headers = [ds for _, ds in members]
    problem = _series_problem(headers)
    if problem is not None:
        return problem
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    steps = np.diff(distance[order])
    if steps.min() < _POSITION_TOLERANCE:
        return "two of its instances lie at the same position along the slice normal (several phases or echoes?)"
    if steps.max() - steps.min() > _SPACING_TOLERANCE * steps.mean():
        logger.warning(
            f"{folder}: the slices of series {uid} are unevenly spaced ({steps.min():.4g} to {steps.max():.4g} mm); "
            "the volume's affine (the 3D outputs) uses the mean step."
        )
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing  # array axis 0: the column index (MONAI swaps DICOM's i and j)
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    affine[:3, 3] = positions[order[0]]
    affine[:2] *= -1.0  # LPS -> RAS, as MONAI's readers
    return DicomSeries(
        folder=os.path.normpath(folder),
        series_uid=uid,
        files=tuple(os.path.normpath(members[i][0]) for i in order),
        sop_instance_uids=tuple(str(headers[i].SOPInstanceUID) for i in order),
        rows=int(headers[0].Rows),
        columns=int(headers[0].Columns),
        affine=affine,
    )


def _scan_dicom_series(folder: str) -> DicomSeries | None:
    """:func:`find_dicom_series` without the cache."""
    import pydicom

    groups: dict[str, list[tuple[str, object]]] = {}
    for path in _dicom_candidates(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue  # not DICOM after all: the image loader names the problem of a listed file
        if "SeriesInstanceUID" in ds and "SOPInstanceUID" in ds and "Rows" in ds and "Columns" in ds:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    found = []
    for uid, members in groups.items():
        if len(members) < 2:
            continue
        if any("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for _, ds in members):
            continue  # projection images (CR, DX, ...) of one series: 2D images, as before
        series = _make_series(folder, uid, members)
        if isinstance(series, str):
            logger.warning(
                f"{folder}: series {uid} ({len(members)} instances) is not read as a volume: {series}; its files are "
                "taken as 2D images."
            )
        else:
            found.append(series)
    if len(found) > 1:
        named = ", ".join(f"{s.series_uid} ({s.depth} instances)" for s in found)
        raise BadImageError(
            folder,
            f"holds {len(found)} DICOM series of several slices ({named}); put each series in a folder of its own",
        )
    return found[0] if found else None


_series_cache: dict[tuple[str, int], DicomSeries | None] = {}
_series_lock = threading.Lock()


def find_dicom_series(folder: str) -> DicomSeries | None:
    """The DICOM series of ``folder`` (its files, not its subfolders) that is read as one 3D volume, or None.

    A series is a volume when two or more instances in the folder share its SeriesInstanceUID and all have
    ImagePositionPatient and ImageOrientationPatient (a cross-sectional series: CT, MR, PET, ...), are single-frame,
    and share Rows x Columns, orientation and PixelSpacing at distinct positions along the slice normal. A series
    whose instances lack position or orientation (radiographs) is left to be taken file by file, as before; one
    that fails the other checks too, with a warning naming the folder. Instances are DICOM-suffixed files and
    files with the DICM preamble whose suffix names no other format. The result is kept per folder and
    modification time (the folder is listed several times in one run).

    Raises:
        BadImageError: the folder holds two or more series that are volumes (one series per folder).
    """
    folder = os.path.normpath(os.fspath(folder))
    try:
        key = (os.path.realpath(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return None
    with _series_lock:
        if key in _series_cache:
            return _series_cache[key]
    series = _scan_dicom_series(folder)
    with _series_lock:
        if len(_series_cache) > 256:
            _series_cache.clear()
        _series_cache[key] = series
    return series


def dicom_series_under(path: str) -> list[DicomSeries]:
    """The DICOM series (:func:`find_dicom_series`) of ``path`` and of every folder below it (hidden ones left out,
    symbolic links to folders not followed), in the order of their folders' sorted paths."""
    found = []
    for root, dirs, _ in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        series = find_dicom_series(root)
        if series is not None:
            found.append(series)
    return sorted(found, key=lambda s: s.folder)


def read_dicom_series(series: DicomSeries, loader: LoadImage | None = None) -> MetaTensor:
    """The instances of a DICOM series as one volume, (C, columns, rows, N) with slice k the k-th of ``series.files``
    (sorted by position, not by file name or InstanceNumber), each instance read by the ``loader`` exactly as a 2D
    DICOM file is (rescale slope and intercept applied). The metadata is the first slice's (its tags: MONOCHROME1 is
    recognised) with the series' ``affine`` and ``original_affine`` (:attr:`DicomSeries.affine`), ``spatial_shape``
    and ``filename_or_obj`` the series' folder.

    MONAI's PydicomReader also reads a folder as a series, but sorts by InstanceNumber, stacks every file of the
    folder, and takes the slice spacing from the z coordinate alone; hence the instances are read one by one here.

    Raises:
        BadImageError: an instance cannot be read (naming it) or differs in shape; the volume is too large.
    """
    voxels = series.rows * series.columns * series.depth
    if voxels > 8 * MAX_PIXELS:
        raise BadImageError(
            series.folder,
            f"DICOM series of {series.depth} slices of {series.rows} x {series.columns} pixels, more than the limit "
            f"of {8 * MAX_PIXELS:,} voxels per volume (bundle.transforms.io.MAX_PIXELS)",
        )
    loader = loader or make_loader()
    slices = [_read_checked(f, loader) for f in series.files]
    expected = tuple(slices[0].shape)
    for f, s in zip(series.files, slices):
        if tuple(s.shape) != expected or len(expected) != 3:
            raise BadImageError(f, f"decodes to shape {tuple(s.shape)}; the series' first slice has {expected}")
    dtypes = {s.dtype for s in slices}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    array = torch.stack([s.as_tensor().to(dtype) for s in slices], dim=-1)
    meta = copy.deepcopy(dict(slices[0].meta))
    meta.pop("affine", None)
    affine = series.affine.copy()
    meta.update(
        {
            "filename_or_obj": series.folder,
            "original_affine": affine,
            "spatial_shape": np.array(array.shape[1:]),
            "spacing": np.linalg.norm(affine[:3, :3], axis=0),
        }
    )
    return MetaTensor(array, affine=torch.as_tensor(affine), meta=meta)
