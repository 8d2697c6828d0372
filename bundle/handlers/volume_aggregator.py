# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Inference handler: the results of a volume scored slice by slice (:mod:`bundle.volumes`) gathered per volume.

Aggregate: a volume's score is the maximum of its scored slices' scores (the top slice), and the volume is abnormal
when that slice is (``volume_score > threshold``). That decision flags a normal volume more often than the per-image
false-positive rate the threshold was set for: a normal volume is flagged when any of its S slices is, which for
independent slices happens with probability 1 - (1 - fpr)^S (S = 100 slices at 5% per slice: 99%; neighbouring
slices are correlated, which lowers it, but not to 5%). With the model's stored normal scores the conformal p-value of
the top slice gives a volume p-value that does hold its level: Bonferroni's ``min(1, S * p_top)`` is a valid p-value
for "all S slices are normal" whatever their dependence, so ``volume_p_value <= alpha`` flags at most a share
``alpha`` of normal volumes (conservative: correlated slices make it larger than it needs to be). With ``alpha`` set
(``--alpha``), the volume decision is ``volume_p_value <= alpha``.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic import write_atomic, write_text_atomic
from ..transforms.io import DicomSeries, find_dicom_series, volume_slice
from ..transforms.regions import find_regions, region_mask

__all__ = ["VOLUME_COLUMNS", "VolumeAggregator", "volume_p_value", "volume_row"]

logger = logging.getLogger(__name__)

VOLUME_COLUMNS = (
    "file",
    "slice_axis",
    "slices",
    "slices_scored",
    "volume_score",
    "top_slice",
    "top_slice_score",
    "abnormal",
    "abnormal_slices",
    "p_value_of_top_slice",
    "volume_p_value",
    "in_domain_slices",
)


def volume_p_value(slice_p_values: list[float] | np.ndarray) -> float:
    """Bonferroni p-value of a volume from the conformal p-values (S,) of its S scored slices: ``min(1, S * min p)``,
    in (0, 1]; valid (``P(p <= alpha) <= alpha`` for a normal volume) whatever the dependence between its slices."""
    p = np.asarray(slice_p_values, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise ValueError("volume_p_value needs the p-value of at least one slice.")
    return float(min(1.0, p.size * p.min()))


def _value(item: Mapping[str, Any], key: str) -> float | None:
    value = item.get(key)
    return None if value is None else float(torch.as_tensor(value).reshape(-1)[0])


def _model_grid_map(heatmap: torch.Tensor) -> torch.Tensor:
    """(1, h, w) heat map -> (h, w) float32 plain tensor on the CPU (no metadata kept per slice)."""
    plain = heatmap.as_tensor() if hasattr(heatmap, "as_tensor") else torch.as_tensor(heatmap)
    return plain.detach().float().cpu().reshape(plain.shape[-2:]).clone()


@dataclass
class _Volume:
    """The slices of one volume gathered so far."""

    filename: str
    spatial_shape: tuple[int, int, int]
    affine: np.ndarray  # (4, 4) of the input file
    slice_axis: int
    slices: dict[int, dict[str, Any]] = field(default_factory=dict)  # slice index -> score, p_value, ..., heatmap


class VolumeAggregator:
    """Gathers the per-slice results of volumes scored slice by slice and writes, per volume,

    - ``<output_dir>/<name>_heatmap.nii.gz``: float32 heat map |x - x'| in [0, 2] of the input's shape and affine;
      each scored slice's (h, w) model-grid map resized (bilinear) back to the slice's in-plane size, zeros on the
      slices not scored;
    - ``<output_dir>/<name>_label.nii.gz``: uint8 in {0, 1}, same geometry: 1 inside the anomaly regions of each
      scored slice (:func:`bundle.transforms.regions.region_mask`: smoothed heat map above ``pixel_threshold``, specks
      removed, mapped to the slice by nearest neighbour as for 2D inputs); all zeros without a ``pixel_threshold``;

    and, when the run completes, ``<output_dir>/volumes.csv``, one row per volume (:data:`VOLUME_COLUMNS`; the
    aggregate and its caveat are in this module's docstring): ``slices`` along ``slice_axis``, ``slices_scored``,
    ``volume_score`` (max over scored slices), ``top_slice`` (its index) and ``top_slice_score``, ``abnormal`` (1/0;
    empty without a threshold), ``abnormal_slices``, ``p_value_of_top_slice`` and ``volume_p_value``
    (:func:`volume_p_value`; empty when the model stores no normal scores), ``in_domain_slices`` (empty without a
    domain check). The top slice is also named in the log. Runs without volumes write nothing.

    Reads the decollated ``engine.state.output`` after postprocessing: ``image`` (its metadata marks a slice,
    :func:`bundle.transforms.io.volume_slice`, and has the volume's ``spatial_shape`` and ``original_affine``),
    ``heatmap`` (1, h, w), ``score``, and ``abnormal``, ``p_value``, ``in_domain`` where present. A volume's slices
    arrive one after the other (``bundle.volumes.expand_volumes`` lists them so, and inference does not shuffle): its
    NIfTI files are written as soon as the next input starts, so only one volume's maps are held.

    Args:
        output_dir: the folder of scores.csv.
        threshold: the model's score threshold (``abnormal = score > threshold``); None: no decision.
        alpha: when set, the volume decision is ``volume_p_value <= alpha`` instead.
        pixel_threshold: the model's pixel threshold on the smoothed heat map ([0, 2]); None: empty label maps.
        filename: the volumes table's name.
        image_key: the output key of the (decollated) input image, whose metadata marks a slice.
        map_key: the output key of the heat map.
        output_format: ``"dicom"``: a volume that is a DICOM series (a folder:
            :func:`bundle.transforms.io.find_dicom_series`) also gets ONE DICOM SEG of its label map and ONE
            Comprehensive SR with its volumes.csv row (:func:`bundle.transforms.dicom_output.write_series_seg_sr`:
            ``<folder name>_seg.dcm``, ``<folder name>_sr.dcm``); ``"default"``: nothing more.
        model_path: the model file, whose name and sha256 the SEG and SR record.
    """

    def __init__(
        self,
        output_dir: str = "outputs",
        threshold: float | None = None,
        alpha: float | None = None,
        pixel_threshold: float | None = None,
        filename: str = "volumes.csv",
        image_key: str = "image",
        map_key: str = "heatmap",
        output_format: str = "default",
        model_path: str | None = None,
    ) -> None:
        from ..transforms.dicom_output import OUTPUT_FORMATS

        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
        self.output_format, self.model_path = output_format, model_path
        self._model: dict[str, str] | None = None
        self.output_dir, self.filename = output_dir, filename
        self.threshold, self.alpha, self.pixel_threshold = threshold, alpha, pixel_threshold
        self.image_key, self.map_key = image_key, map_key
        self._current: _Volume | None = None
        self._rows: list[dict[str, Any]] = []
        self._names: set[str] = set()

    def attach(self, engine: Engine) -> None:
        """Collects every iteration's output and writes the last volume and volumes.csv when the run completes."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.complete)

    def _reset(self, _engine: Engine | None = None) -> None:
        self._current, self._rows, self._names = None, [], set()

    def _output_name(self, filename: str) -> str:
        """The stem of a volume's output files: its file name without .nii/.nii.gz (a series: its folder's name),
        with ``_2``, ``_3`` ... added when an earlier volume of this run had the same stem (e.g. ``p1/CT`` and
        ``p2/CT``), so that no output replaces another."""
        name = os.path.basename(os.path.abspath(filename))
        for suffix in (".nii.gz", ".nii"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        unique, k = name, 1
        while unique in self._names:
            k += 1
            unique = f"{name}_{k}"
        if unique != name:
            logger.warning(f"{filename}: another volume's outputs are named {name}_*: this one's are {unique}_*.")
        self._names.add(unique)
        return unique

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            self.add(item)

    def add(self, item: Mapping[str, Any]) -> None:
        """One decollated, postprocessed item; a 2D image ends the volume before it (if any) and is not kept."""
        image = item.get(self.image_key)
        meta = getattr(image, "meta", None)
        scored_slice = volume_slice(meta)
        if scored_slice is None:
            self._finish_volume()
            return
        axis, index = scored_slice
        filename = str(meta["filename_or_obj"])
        if self._current is None or self._current.filename != filename or index in self._current.slices:
            self._finish_volume()
            shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
            affine = np.asarray(torch.as_tensor(meta.get("original_affine", meta.get("affine"))).cpu(), np.float64)
            self._current = _Volume(filename, shape, affine, axis)
        self._current.slices[index] = {
            "score": _value(item, "score"),
            "abnormal": _value(item, "abnormal"),
            "p_value": _value(item, "p_value"),
            "in_domain": _value(item, "in_domain"),
            "heatmap": _model_grid_map(item[self.map_key]),
        }

    def complete(self, _engine: Engine | None = None) -> None:
        """Writes the volume in progress (its NIfTI files) and volumes.csv (atomically; not when no volume came)."""
        self._finish_volume()
        if not self._rows:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=VOLUME_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        write_text_atomic(os.path.join(self.output_dir, self.filename), text.getvalue())

    def _finish_volume(self) -> None:
        volume, self._current = self._current, None
        if volume is None:
            return
        heat, label = self._volume_maps(volume)
        name = self._output_name(volume.filename)
        os.makedirs(self.output_dir, exist_ok=True)
        self._save_nifti(heat, volume.affine, os.path.join(self.output_dir, f"{name}_heatmap.nii.gz"))
        self._save_nifti(label, volume.affine, os.path.join(self.output_dir, f"{name}_label.nii.gz"))
        row = self._row(volume)
        self._rows.append(row)
        decision = "" if row["abnormal"] == "" else (", abnormal" if row["abnormal"] else ", normal")
        series = find_dicom_series(volume.filename) if os.path.isdir(volume.filename) else None
        instance = ""
        if series is not None and volume.slice_axis == 2:
            instance = f" (SOP Instance UID {series.sop_instance_uids[row['top_slice']]})"
        logger.info(
            f"{volume.filename}: {row['slices_scored']} of {row['slices']} slices along axis {volume.slice_axis} "
            f"scored; volume score {row['volume_score']:.6g} (the maximum) at slice {row['top_slice']}{instance}"
            f"{decision}."
        )
        if series is not None and self.output_format == "dicom":
            self._write_dicom(series, volume, label, row, name)
        if row["in_domain_slices"] != "" and row["in_domain_slices"] < row["slices_scored"]:
            outside = row["slices_scored"] - row["in_domain_slices"]
            logger.warning(
                f"{volume.filename}: {outside} of {row['slices_scored']} scored slices are outside the training "
                "domain: their scores are not calibrated."
            )

    def _write_dicom(
        self, series: DicomSeries, volume: _Volume, label: np.ndarray, row: dict[str, Any], name: str
    ) -> None:
        """The SEG and SR of a DICOM series (:func:`bundle.transforms.dicom_output.write_series_seg_sr`)."""
        from ..transforms.dicom_output import model_identity, write_series_seg_sr

        if self._model is None:
            self._model = model_identity(self.model_path)
        result = {"threshold": self.threshold, "alpha": self.alpha, "pixel_threshold": self.pixel_threshold}
        mask = None if self.pixel_threshold is None else label
        write_series_seg_sr(series, mask, row, {**result, **self._model}, self.output_dir, volume.slice_axis, name)

    def _volume_maps(self, volume: _Volume) -> tuple[np.ndarray, np.ndarray]:
        """(S0, S1, S2) float32 heat map and uint8 label map of the volume."""
        heat = np.zeros(volume.spatial_shape, np.float32)
        label = np.zeros(volume.spatial_shape, np.uint8)
        in_plane = tuple(s for a, s in enumerate(volume.spatial_shape) if a != volume.slice_axis)
        for index, result in volume.slices.items():
            where = tuple(index if a == volume.slice_axis else slice(None) for a in range(3))
            model_grid = result["heatmap"]
            resized = torch.nn.functional.interpolate(
                model_grid[None, None], size=in_plane, mode="bilinear", align_corners=False
            )
            heat[where] = resized[0, 0].numpy()
            if self.pixel_threshold is not None:
                labels, smoothed = region_mask(model_grid, self.pixel_threshold)
                mapped, _ = find_regions(labels, smoothed, in_plane)
                label[where] = mapped > 0
        return heat, label

    @staticmethod
    def _save_nifti(data: np.ndarray, affine: np.ndarray, path: str) -> None:
        import nibabel

        image = nibabel.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)  # scanner coordinates, as MONAI's readers give the input's affine
        image.set_sform(affine, code=1)
        data = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)  # nibabel's own level for .nii.gz
        write_atomic(path, lambda f: f.write(data))

    def _row(self, volume: _Volume) -> dict[str, Any]:
        return volume_row(
            volume.filename, volume.spatial_shape, volume.slice_axis, volume.slices, self.threshold, self.alpha
        )


def volume_row(
    filename: str,
    spatial_shape: tuple[int, ...],
    slice_axis: int,
    slices: Mapping[int, Mapping[str, Any]],
    threshold: float | None = None,
    alpha: float | None = None,
) -> dict[str, Any]:
    """One row of volumes.csv (:data:`VOLUME_COLUMNS`) from the results of a volume's scored slices.

    Args:
        filename: the volume's file.
        spatial_shape: (S0, S1, S2) of the volume.
        slice_axis: the axis its slices were taken along (0, 1 or 2).
        slices: slice index -> ``{"score": float in [0, 1], "abnormal": 0/1 or None, "p_value": (0, 1] or None,
            "in_domain": 0/1 or None}``; at least one slice.
        threshold: the score threshold (``abnormal = volume_score > threshold``); None: no decision.
        alpha: when set (and every slice has a p-value), the decision is ``volume_p_value <= alpha`` instead.

    Returns:
        The row: ``volume_score`` is the highest slice score (the aggregate of this module's docstring); columns
        the slices cannot give are ``""``.
    """
    indices = sorted(slices)
    if not indices:
        raise ValueError(f"{filename}: volume_row needs at least one scored slice.")
    scores = np.array([slices[k]["score"] for k in indices], np.float64)
    top = indices[int(np.argmax(scores))]
    top_score = float(scores.max())
    p_values = [slices[k].get("p_value") for k in indices]
    has_p = all(p is not None for p in p_values)
    abnormal: int | str = ""
    if alpha is not None and has_p:
        abnormal = int(volume_p_value(p_values) <= alpha)
    elif threshold is not None:
        abnormal = int(top_score > threshold)
    flags = [slices[k].get("abnormal") for k in indices]
    domain = [slices[k].get("in_domain") for k in indices]
    return {
        "file": filename,
        "slice_axis": slice_axis,
        "slices": spatial_shape[slice_axis],
        "slices_scored": len(indices),
        "volume_score": top_score,
        "top_slice": top,
        "top_slice_score": top_score,
        "abnormal": abnormal,
        "abnormal_slices": sum(int(f > 0.5) for f in flags) if all(f is not None for f in flags) else "",
        "p_value_of_top_slice": slices[top]["p_value"] if has_p else "",
        "volume_p_value": volume_p_value(p_values) if has_p else "",
        "in_domain_slices": sum(int(d > 0.5) for d in domain) if all(d is not None for d in domain) else "",
    }
