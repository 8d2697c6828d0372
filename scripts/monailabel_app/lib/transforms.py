# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Transforms of the SAGAN MONAI Label app: reading an input (file or DICOM series folder) and turning the bundle's
outputs into what MONAI Label's writer and clients expect."""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImage, MapTransform

from bundle.domain import OUT_OF_DOMAIN_MESSAGE
from bundle.transforms import BadImageError, load_grayscale

__all__ = [
    "LABEL_VALUE",
    "PHOTO_SUFFIXES",
    "LoadSAGANImaged",
    "SAGANResultd",
    "is_dicom_file",
    "load_dicom_series",
    "short_problem",
]

LABEL_VALUE = 1  # the "anomaly" label's value in the label image (0 elsewhere)
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")  # inputs without geometry: their label is a PNG


# the reader whose error explains an unreadable file, by suffix (MONAI tries every reader and lists all errors)
_READER_ERRORS = (
    (PHOTO_SUFFIXES, "PNG/JPEG/BMP", "UnidentifiedImageError"),
    ((".dcm", ".dicom"), "DICOM", "InvalidDicomError"),
    ((".nii", ".nii.gz"), "NIfTI", "ImageFileError"),
)
READABLE = "PNG, JPEG, BMP, DICOM (a file or a series folder) or NIfTI"


def short_problem(problem: str, path: str, name: str) -> str:
    """One line for a :class:`bundle.transforms.BadImageError` problem of the file ``path``, shown as ``name``
    (e.g. an upload's own name instead of the server's temporary file): of MONAI's every-reader list ("cannot read
    image (UnidentifiedImageError: ...; InvalidDicomError: ...; NRRDError: ...)") only the error of the reader that
    the suffix calls for is kept; other problems are returned as they are, ``path`` replaced by ``name``."""
    problem = problem.replace(path, name)
    match = re.fullmatch(r"cannot read image \((.*)\)", problem, flags=re.DOTALL)
    if match is None or "; " not in match.group(1):
        return problem
    errors = re.split(r"; (?=[A-Z]\w*(?:Error|Exception): )", match.group(1))
    for suffixes, kind, error in _READER_ERRORS:
        if name.lower().endswith(suffixes):
            reason = next((e for e in errors if e.startswith(f"{error}: ")), errors[0])
            return f"cannot read it as a {kind} image ({reason})"
    return f"not an image the app reads ({READABLE}; judged by the file name's suffix and contents)"


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` is a DICOM file: the ``.dcm`` suffix or the "DICM" marker after the 128-byte preamble."""
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def load_dicom_series(folder: str, slice_index: int | None = None) -> MetaTensor:
    """Read one slice of the DICOM series in ``folder`` as a (1, S0, S1) float32 MetaTensor in [0, 1], with the same
    conventions as :func:`bundle.transforms.load_grayscale` for a single DICOM file (MONAI's spatial order, 8-bit
    data divided by 255, anything else min-max scaled, MONOCHROME1 inverted), so that a slice scores exactly as
    that slice's file does in the bundle. The series is read with ITK (MONAI's ``ITKReader``), which sorts the
    slices by position; its metadata (``spatial_shape`` (X, Y, N), ``original_affine``) describes the whole series.

    Raises:
        BadImageError: no readable DICOM series in the folder, a series of several slices and no ``slice_index``,
            a ``slice_index`` outside the series, more than one channel, NaN/inf values.
    """
    files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    dicoms = [f for f in files if is_dicom_file(os.path.join(folder, f))]
    if not dicoms:
        raise BadImageError(folder, "is a folder without DICOM files; a folder input must hold one DICOM series")
    try:
        img = LoadImage(reader=ITKReader(), image_only=True, ensure_channel_first=True, dtype=None)(folder)
    except Exception as e:  # ITK raises its own types; the user needs the folder and the reason
        raise BadImageError(folder, f"cannot read a DICOM series ({type(e).__name__}: {e})") from e
    spatial = tuple(int(s) for s in img.shape[1:])
    if len(spatial) == 2:
        img = img[..., None]
        spatial = (*spatial, 1)
    depth = spatial[-1]
    if depth == 1:
        k = 0
    elif slice_index is None:
        raise BadImageError(
            folder,
            f"is a DICOM series of {depth} slices (shape {spatial}); SAGAN scores one 2D slice: choose one with "
            f"slice_index (0..{depth - 1}, in the order of the slice positions)",
        )
    elif not -depth <= slice_index < depth:
        raise BadImageError(folder, f"slice_index {slice_index} outside a series of {depth} slices")
    else:
        k = slice_index % depth
    if img.shape[0] != 1:
        raise BadImageError(folder, f"has {img.shape[0]} channels per pixel; a grey DICOM series is needed")
    source_dtype = img.dtype
    plane = img[..., k].float()
    if not torch.isfinite(plane).all():
        raise BadImageError(folder, "contains NaN or infinite values")
    if source_dtype == torch.uint8:
        plane = plane / 255.0
    else:
        lo, hi = plane.min(), plane.max()
        plane = (plane - lo) / (hi - lo) if hi > lo else torch.zeros_like(plane)
    # ITK's series reader does not pass on the DICOM tags: read the photometric interpretation from one file
    header = pydicom.dcmread(os.path.join(folder, dicoms[0]), stop_before_pixels=True)
    if str(getattr(header, "PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        plane = 1.0 - plane
    plane.meta["spatial_shape"] = np.asarray(spatial)
    plane.meta["filename_or_obj"] = folder
    return plane


class LoadSAGANImaged(MapTransform):
    """Replaces the input's path by a (1, S0, S1) grey image in [0, 1]: files through the bundle's
    :func:`bundle.transforms.load_grayscale` (PNG/JPEG/BMP, DICOM, NIfTI), folders as one DICOM series
    (:func:`load_dicom_series`). ``slice_index`` picks the slice of a 3D input; a 3D input without it is refused."""

    def __init__(self, keys: str = "image", slice_index: int | None = None) -> None:
        super().__init__(keys)
        self.slice_index = slice_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, str):
                raise BadImageError(str(path), "the SAGAN app takes an image path or a DICOM series folder")
            if os.path.isdir(path):
                d[key] = load_dicom_series(path, self.slice_index)
            else:
                d[key] = load_grayscale(path, self.slice_index)
        return d


class SAGANResultd(MapTransform):
    """Final post transform: the label image for MONAI Label's writer and the JSON result.

    Reads ``label_key`` ((1, *spatial) uint8 in {0, 1}, the input's grid, from
    :class:`bundle.transforms.regions.AnomalyRegionsd`), ``score_key`` ((1,) in [0, 1]) and ``regions_key``, and sets:

    - ``pred``: the label as a numpy array in MONAI's spatial order, values {0, ``LABEL_VALUE``}: (S0, S1) for
      PNG/JPEG/BMP inputs (written as PNG: no geometry to keep, and a JPEG label would be lossy), otherwise a volume
      (S0, S1, Z) with the input's affine in ``pred_meta_dict`` (written as NIfTI unless the request names another
      ``result_extension``) so that viewers overlay it on the input's geometry;
    - ``result``: ``anomaly_score``, ``in_domain`` (whether the image is like the model's training images; ``None``
      for a model without the check), ``domain_distance``, ``message`` ("outside the training domain: score not
      calibrated" when it is not, else ``None``), ``abnormal`` (``score > threshold``; ``None`` when the model
      records no threshold), ``threshold``, ``p_value`` (the score's conformal p-value among the normal scores that
      set the threshold, in [1 / (n + 1), 1], from :class:`bundle.conformal.ConformalPValued`; ``None`` for a model
      that stores none), ``pixel_threshold``, ``regions``, ``slice_index`` and ``model``: what
      the model file records of ``bundle_version``, ``iteration`` (of the checkpoint), ``selected_by`` and
      ``image_size`` (a key the file does not record is left out rather than shown as null).
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        slice_index: int | None,
        label_key: str = "anomaly_label",
        score_key: str = "score",
        regions_key: str = "regions",
        pred_key: str = "pred",
    ) -> None:
        super().__init__([label_key, score_key])
        self.settings = settings
        self.slice_index = slice_index
        self.label_key, self.score_key, self.regions_key, self.pred_key = label_key, score_key, regions_key, pred_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        array = np.asarray(torch.as_tensor(label)[0].cpu().numpy(), np.uint8) * np.uint8(LABEL_VALUE)
        path = str(d.get("image_path") or "")
        if path.lower().endswith(PHOTO_SUFFIXES):
            d[self.pred_key], extension = array, ".png"
        else:
            d[self.pred_key] = array if array.ndim == 3 else array[..., None]
            affine = label.meta.get("affine") if isinstance(label, MetaTensor) else None
            d[f"{self.pred_key}_meta_dict"] = {"affine": None if affine is None else np.asarray(affine, np.float64)}
            extension = ".nii.gz" if os.path.isdir(path) or path.lower().endswith((".dcm", ".dicom")) else None
        if extension and not d.get("result_extension"):
            d["result_extension"] = extension
        score = float(torch.as_tensor(d[self.score_key]).reshape(-1)[0])
        threshold = self.settings.get("threshold")
        regions = d.get(self.regions_key, [])
        inside, p_value = d.get("in_domain"), d.get("p_value")
        in_domain = None if inside is None else bool(float(torch.as_tensor(inside).reshape(-1)[0]) == 1.0)
        d["result"] = {
            "anomaly_score": score,
            "in_domain": in_domain,
            "domain_distance": None if inside is None else float(torch.as_tensor(d["domain_distance"]).reshape(-1)[0]),
            "message": OUT_OF_DOMAIN_MESSAGE if in_domain is False else None,
            "abnormal": None if threshold is None else bool(score > threshold),
            "threshold": None if threshold is None else float(threshold),
            "p_value": None if p_value is None else float(torch.as_tensor(p_value).reshape(-1)[0]),
            "pixel_threshold": self.settings.get("pixel_threshold"),
            "regions": regions,
            "slice_index": self.slice_index,
            "model": {
                k: self.settings[k]
                for k in ("bundle_version", "iteration", "selected_by", "image_size")
                if self.settings.get(k) is not None
            },
        }
        return d
