# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Transforms of the SAGAN MONAI Label app: reading an input (file or DICOM series folder) and turning the bundle's
outputs into what MONAI Label's writer and clients expect."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import ITKReader, MetaTensor
from monai.transforms import LoadImage, MapTransform

from bundle.domain import OUT_OF_DOMAIN_MESSAGE
from bundle.handlers.volume_aggregator import VOLUME_COLUMNS, volume_row
from bundle.transforms import BadImageError, LoadGrayscaleImaged, load_grayscale
from bundle.transforms.io import volume_slice
from bundle.transforms.regions import MIN_REGION_SIZE, find_regions, region_mask

__all__ = [
    "LABEL_VALUE",
    "PHOTO_SUFFIXES",
    "LoadSAGANImaged",
    "LoadVolumeSlicesd",
    "SAGANResultd",
    "ScoreVolumeSlicesd",
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


def _plain(value: Any) -> torch.Tensor:
    """A tensor without MONAI's metadata (MetaTensor -> torch.Tensor)."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


def _first(value: Any) -> float | None:
    """The first element of a (1,) tensor or array as a float; ``None`` stays ``None``."""
    return None if value is None else float(torch.as_tensor(value).reshape(-1)[0])


class LoadVolumeSlicesd(MapTransform):
    """Replaces the path of a 3D volume by the stack of the slices to score, each read and preprocessed as
    ``monai.bundle run inferring`` reads and preprocesses it.

    ``items`` are the data items :func:`bundle.volumes.expand_volumes` makes of the volume (one per slice that holds
    foreground: ``{"image": path, "slice_index": k, "slice_axis": a}``, ascending ``k``); each is read by the bundle's
    :class:`bundle.transforms.LoadGrayscaleImaged` (the slice alone, min-max scaled over the slice; its metadata
    names the slice and keeps the volume's ``spatial_shape`` and ``original_affine``) and put through ``transforms``
    (the rest of the bundle's preprocessing: resizing to the model grid, scaling to [-1, 1]).

    Sets ``keys``: (S, 1, h, w) plain tensor, the S slices in ``items`` order (the network's batch), and
    ``slices_key``: the S preprocessed (1, h, w) MetaTensors with their metadata, for :class:`ScoreVolumeSlicesd`.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        transforms: Sequence[Callable],
        keys: str = "image",
        slices_key: str = "sagan_slices",
    ) -> None:
        super().__init__(keys)
        if not items:
            raise ValueError("LoadVolumeSlicesd needs at least one slice item.")
        self.items = [dict(item) for item in items]
        self.transforms = list(transforms)
        self.slices_key = slices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            loader = LoadGrayscaleImaged(key)
            slices = []
            for item in self.items:
                one = loader({**item, key: item.get(key, d[key])})
                for transform in self.transforms:
                    one = transform(one)
                slices.append(one[key])
            d[key] = torch.stack([_plain(s) for s in slices])
            d[self.slices_key] = slices
        return d


class ScoreVolumeSlicesd(MapTransform):
    """Scores a volume slice by slice and aggregates the slices as ``monai.bundle run inferring`` does for a 3D NIfTI
    volume (:mod:`bundle.volumes`, :class:`bundle.handlers.VolumeAggregator`).

    Reads ``slices_key`` (the S preprocessed slices of :class:`LoadVolumeSlicesd`) and ``pred_key`` (S, 1, h, w: the
    restored slices). Each slice goes through ``transforms`` (the bundle's postprocessing: heat map and score, domain
    check, conformal p-value and ``abnormal``) as a 2D image does, and its anomaly regions are found by the rule of 2D
    images (:func:`bundle.transforms.regions.region_mask` with ``min_size``, then
    :func:`~bundle.transforms.regions.find_regions` onto the slice's in-plane size). The volume, as in volumes.csv:
    :func:`bundle.handlers.volume_aggregator.volume_row`, the row of volumes.csv: its score is the top slice's (the
    maximum); it is abnormal when ``volume_p_value <= alpha`` with ``alpha`` (Bonferroni over the S scored slices,
    ``min(1, S * p_top)``), else when ``volume score > threshold``; ``None`` without either.

    Sets ``label_key``: (1, S0, S1, S2) uint8 MetaTensor in {0, 1} (1 inside the regions of each scored slice, 0
    elsewhere and on the slices not scored) carrying the volume file's affine; ``score_key``: (1,) the volume score;
    ``abnormal`` (1,) where decided; ``p_value`` (1,) the volume p-value (when the model stores normal scores);
    ``in_domain`` (1,) 1.0 when every scored slice is in the training domain and ``domain_distance`` (1,) the largest
    of the slices' (with a domain check); ``regions_key``: the regions of every slice with their ``slice``, highest
    ``peak_heat`` first; ``volume_key``: the volume's row of volumes.csv (``slice_axis``, ``slices``,
    ``slices_scored``, ``volume_score``, ``top_slice``, ``top_slice_score``, ``abnormal``, ``abnormal_slices``,
    ``p_value_of_top_slice``, ``volume_p_value``, ``in_domain_slices``; ``None`` where volumes.csv is empty) and
    ``slice_results``: per scored slice (ascending) ``slice``, ``anomaly_score``, ``p_value``, ``abnormal`` (the slice's
    own decision: ``score > threshold``, or ``p_value <= alpha``), ``in_domain``, ``domain_distance``.
    """

    def __init__(
        self,
        transforms: Sequence[Callable],
        threshold: float | None,
        pixel_threshold: float | None,
        alpha: float | None = None,
        min_size: int = MIN_REGION_SIZE,
        slices_key: str = "sagan_slices",
        pred_key: str = "pred",
        label_key: str = "anomaly_label",
        score_key: str = "score",
        regions_key: str = "regions",
        volume_key: str = "volume",
    ) -> None:
        super().__init__([slices_key, pred_key])
        self.transforms = list(transforms)
        self.threshold, self.pixel_threshold, self.alpha, self.min_size = threshold, pixel_threshold, alpha, min_size
        self.slices_key, self.pred_key, self.label_key = slices_key, pred_key, label_key
        self.score_key, self.regions_key, self.volume_key = score_key, regions_key, volume_key

    def _score_slice(self, image: MetaTensor, pred: torch.Tensor) -> dict[Hashable, Any]:
        item: dict[Hashable, Any] = {"image": image, "pred": pred}
        for transform in self.transforms:
            item = transform(item)
        return item

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        slices = d.pop(self.slices_key)
        meta = slices[0].meta
        shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
        affine = meta.get("original_affine", meta.get("affine"))
        label = np.zeros(shape, np.uint8)
        results: list[dict[str, Any]] = []
        regions: list[dict[str, Any]] = []
        axis = 2
        for image, pred in zip(slices, d[self.pred_key]):
            item = self._score_slice(image, pred)
            axis, index = volume_slice(image.meta)
            if self.pixel_threshold is not None:
                in_plane = tuple(s for a, s in enumerate(shape) if a != axis)
                labels, smoothed = region_mask(item["heatmap"], self.pixel_threshold, self.min_size)
                mapped, found = find_regions(labels, smoothed, in_plane)
                label[tuple(index if a == axis else slice(None) for a in range(3))] = mapped > 0
                regions.extend({**r, "slice": index} for r in found)
            flag, inside = _first(item.get("abnormal")), _first(item.get("in_domain"))
            results.append(
                {
                    "slice": index,
                    "anomaly_score": _first(item["score"]),
                    "p_value": _first(item.get("p_value")),
                    "abnormal": None if flag is None else flag > 0.5,
                    "in_domain": None if inside is None else inside > 0.5,
                    "domain_distance": _first(item.get("domain_distance")),
                }
            )
        results.sort(key=lambda r: r["slice"])
        row = volume_row(
            str(meta.get("filename_or_obj", "")),
            shape,
            axis,
            {
                r["slice"]: {
                    "score": r["anomaly_score"],
                    "abnormal": None if r["abnormal"] is None else float(r["abnormal"]),
                    "p_value": r["p_value"],
                    "in_domain": None if r["in_domain"] is None else float(r["in_domain"]),
                }
                for r in results
            },
            self.threshold,
            self.alpha,
        )
        summary = {k: None if row[k] == "" else row[k] for k in VOLUME_COLUMNS if k != "file"}
        summary["abnormal"] = None if summary["abnormal"] is None else bool(summary["abnormal"])
        regions.sort(key=lambda r: r["peak_heat"], reverse=True)
        label_meta = {"affine": torch.as_tensor(np.asarray(affine, np.float64))} if affine is not None else {}
        d[self.label_key] = MetaTensor(torch.from_numpy(label[None]), meta=label_meta)
        d[self.score_key] = torch.tensor([summary["volume_score"]], dtype=torch.float64)
        d[self.regions_key] = regions
        if summary["abnormal"] is not None:
            d["abnormal"] = torch.tensor([float(summary["abnormal"])])
        if summary["volume_p_value"] is not None:
            d["p_value"] = torch.tensor([summary["volume_p_value"]], dtype=torch.float64)
        if summary["in_domain_slices"] is not None:
            d["in_domain"] = torch.tensor([float(summary["in_domain_slices"] == len(results))])
            d["domain_distance"] = torch.tensor([max(r["domain_distance"] for r in results)], dtype=torch.float64)
        d[self.volume_key] = {**summary, "slice_results": results}
        return d


class SAGANResultd(MapTransform):
    """Final post transform: the label image for MONAI Label's writer and the JSON result.

    Reads ``label_key`` ((1, *spatial) uint8 in {0, 1}, the input's grid, from
    :class:`bundle.transforms.regions.AnomalyRegionsd` or :class:`ScoreVolumeSlicesd`), ``score_key`` ((1,) in
    [0, 1]), ``regions_key``, and where present ``abnormal``, ``p_value``, ``in_domain``, ``domain_distance`` and
    ``volume_key``, and sets:

    - ``pred``: the label as a numpy array in MONAI's spatial order, values {0, ``LABEL_VALUE``}: (S0, S1) for
      PNG/JPEG/BMP inputs (written as PNG: no geometry to keep, and a JPEG label would be lossy), otherwise a volume
      (S0, S1, Z) with the input's affine in ``pred_meta_dict`` (written as NIfTI unless the request names another
      ``result_extension``) so that viewers overlay it on the input's geometry;
    - ``result``: ``anomaly_score``, ``in_domain`` (whether the image is like the model's training images; ``None``
      for a model without the check), ``domain_distance``, ``message`` ("outside the training domain: score not
      calibrated" when it is not, else ``None``), ``abnormal`` (the item's ``abnormal``: ``score > threshold``, or
      ``p_value <= alpha`` when the request gave ``alpha``; ``None`` when neither decides), ``threshold``, ``alpha``
      (the request's, else ``None``), ``p_value`` (the score's conformal p-value among the normal scores that set the
      threshold, in [1 / (n + 1), 1], from :class:`bundle.conformal.ConformalPValued`; ``None`` for a model that
      stores none), ``pixel_threshold``, ``regions``, ``slice_index``, ``volume`` (a volume scored slice by slice:
      :class:`ScoreVolumeSlicesd`'s summary, whose aggregate the other keys then hold; else ``None``) and ``model``:
      what the model file records of ``bundle_version``, ``iteration`` (of the checkpoint), ``selected_by`` and
      ``image_size`` (a key the file does not record is left out rather than shown as null).
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        slice_index: int | None,
        alpha: float | None = None,
        label_key: str = "anomaly_label",
        score_key: str = "score",
        regions_key: str = "regions",
        pred_key: str = "pred",
        volume_key: str = "volume",
    ) -> None:
        super().__init__([label_key, score_key])
        self.settings = settings
        self.slice_index = slice_index
        self.alpha = alpha
        self.volume_key = volume_key
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
        threshold = self.settings.get("threshold")
        inside, flag = _first(d.get("in_domain")), _first(d.get("abnormal"))
        in_domain = None if inside is None else inside == 1.0
        d["result"] = {
            "anomaly_score": _first(d[self.score_key]),
            "in_domain": in_domain,
            "domain_distance": None if inside is None else _first(d["domain_distance"]),
            "message": OUT_OF_DOMAIN_MESSAGE if in_domain is False else None,
            "abnormal": None if flag is None else flag > 0.5,
            "threshold": None if threshold is None else float(threshold),
            "alpha": self.alpha,
            "p_value": _first(d.get("p_value")),
            "pixel_threshold": self.settings.get("pixel_threshold"),
            "regions": d.get(self.regions_key, []),
            "slice_index": self.slice_index,
            "volume": d.pop(self.volume_key, None),
            "model": {
                k: self.settings[k]
                for k in ("bundle_version", "iteration", "selected_by", "image_size")
                if self.settings.get(k) is not None
            },
        }
        return d
