# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The ``sagan`` infer task: the bundle's own inference pipeline (``configs/inference.json``) with the model's
anomaly score, its abnormal/normal decision (the model's threshold, or a conformal level ``alpha``) and the anomaly
regions as a label image on the input's grid; a 3D NIfTI volume is scored slice by slice as ``run inferring`` does."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from torch import nn

from bundle.conformal import ConformalPValued
from bundle.data import DatalistError
from bundle.settings import generator_from_settings, load_model_settings, read_model, settings_from_model
from bundle.transforms import BadImageError, LoadGrayscaleImaged, SaveDicomSegSRd, SaveHeatmapd
from bundle.transforms.dicom_output import build_segmentation, model_identity, read_source_dicom, source_grid_mask
from bundle.transforms.io import SLICE_INDEX_KEY
from bundle.transforms.regions import MIN_REGION_SIZE, AnomalyRegionsd
from bundle.volumes import FOREGROUND_LEVEL, FOREGROUND_SHARE, expand_volumes

from ..compat import placeholder_torchvision
from ..transforms import LABEL_VALUE, LoadSAGANImaged, LoadVolumeSlicesd, SAGANResultd, ScoreVolumeSlicesd

with placeholder_torchvision():
    from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

__all__ = ["ServedModel", "SAGANInferTask", "read_served_model"]

logger = logging.getLogger(__name__)

SLICES_KEY = "sagan_slices"  # the preprocessed slices of a volume scored slice by slice (LoadVolumeSlicesd)


def read_served_model(path: str) -> tuple[dict[str, Any], nn.Module]:
    """``(settings, generator)`` of the model file ``path``, read once: the settings as
    :func:`bundle.settings.load_model_settings` gives them, the generator (CPU, weights loaded strictly).

    Raises:
        ValueError: not a readable model file; RuntimeError: weights that do not fit the recorded architecture.
    """
    state, stored = read_model(path)
    settings = settings_from_model(state, stored)
    network = generator_from_settings(settings)
    network.load_state_dict(state, strict=True)
    return settings, network


@dataclass
class ServedModel:
    """One model file as loaded: its path and modification time, the settings it records, the generator on a
    device (eval mode)."""

    path: str
    mtime_ns: int
    settings: dict[str, Any]
    network: nn.Module


class _Constants(BundleConstants):
    """The bundle's file names, except the weights: the served model may live outside the bundle (a model trained
    through MONAI Label is published to the app's model folder, never into the bundle). ``BundleInferTask`` joins
    ``<bundle>/models/<name>``, and ``os.path.join`` with an absolute last part gives that absolute path."""

    def __init__(self, task: SAGANInferTask) -> None:
        self.task = task

    def model_pytorch(self) -> str:
        return self.task.served_path() or "model.pt"

    def model_torchscript(self) -> str:
        return self.model_pytorch()


class SAGANInferTask(BundleInferTask):
    """Scores one image with the served SAGAN generator and returns the anomaly regions as a segmentation.

    The model files are tried in ``model_paths`` order, the last existing one served (a model published by the
    app's train task comes after the bundle's ``models/model.pt``); a newer file (modification time) is picked up
    at the next request. Architecture, image size, slice index, thresholds and normal scores come from the model file,
    read once per version (:func:`read_served_model`; the bundle config's ``model_settings`` is that reading). The
    bundle's post transforms that write files are dropped: nothing is written into the bundle folder.

    Request parameters: ``alpha`` (optional, a number in (0, 1): the image is abnormal when its conformal p-value is
    ``<= alpha``, as ``run inferring --alpha``; the model must store normal scores; without it the model's threshold
    decides), ``slice_index`` (which slice of a 3D input to score; default: the model's), ``dicom_seg`` (``true``:
    the label comes back as a DICOM SEG on the source image instead of NIfTI; a single DICOM file input only, see
    :meth:`write_dicom_seg`), and MONAI Label's usual ones (``device``, ``result_extension``, ...).

    A 3D NIfTI volume without a ``slice_index`` (in the request or the model) is scored slice by slice as
    ``run inferring`` does (:func:`bundle.volumes.expand_volumes`: every slice along the model's ``slice_axis`` that
    holds foreground; see :class:`lib.transforms.ScoreVolumeSlicesd` for the aggregate); a volume without such a
    slice is refused. DICOM series folders still need a ``slice_index``.

    Result: the label image (values {0, 1}, 1 = anomaly region) at the input's size and geometry (a volume: the
    regions of every scored slice, zeros elsewhere), and JSON (``data["result"]``) with ``anomaly_score``,
    ``abnormal``, ``threshold``, ``alpha``, ``p_value``, ``in_domain``, ``domain_distance``, ``message``,
    ``pixel_threshold``, ``regions`` (boxes in input pixel coordinates with their peak heat), ``slice_index``,
    ``volume`` (volumes scored slice by slice: the volume's summary and per-slice results) and ``model``
    (:class:`lib.transforms.SAGANResultd`).
    """

    def __init__(
        self, bundle_path: str, model_paths: list[str], conf: dict[str, str], min_region_size: int = MIN_REGION_SIZE
    ) -> None:
        self.model_paths = [os.path.realpath(p) for p in model_paths]
        self.min_region_size = min_region_size
        self._served: dict[str, ServedModel] = {}
        self._identities: dict[tuple[str, int], dict[str, str]] = {}  # model_identity (sha256) per file version
        self._lock = threading.Lock()
        super().__init__(
            bundle_path,
            conf,
            const=_Constants(self),
            type=InferType.SEGMENTATION,
            pre_filter=[LoadGrayscaleImaged],  # replaced by LoadSAGANImaged, which also reads DICOM series folders
            post_filter=[SaveImaged, SaveHeatmapd, SaveDicomSegSRd],
            add_post_restore=False,  # AnomalyRegionsd maps the regions back to the input grid itself
            load_strict=True,
        )
        if not self.valid:
            return
        self.path = list(self.model_paths)
        self.network = None  # built from each model file's own settings (see served_model)
        self.labels = {"anomaly": LABEL_VALUE}
        self.description = "SAGAN anomaly detection: anomaly score, abnormal/normal, and the suspect regions"
        self._config.pop("model_filename", None)  # the bundle's other .pt files are training states, not models

    def served_path(self) -> str | None:
        """The model file served now: the last existing of ``model_paths``, or ``None``."""
        existing = [p for p in self.model_paths if os.path.isfile(p)]
        return existing[-1] if existing else None

    def is_valid(self) -> bool:
        return self.valid and self.served_path() is not None

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        """The bundle's inference config (as ``BundleInferTask`` reads it) serving ``served_path()``, whose
        ``model_settings`` are those of the model as read by :meth:`served_model` (not a second reading)."""
        bundle_config = ConfigParser(globals={"sagan_model_settings": self._config_settings})
        bundle_config.read_config(config)
        bundle_config.config.update({self.const.key_bundle_root(): path})
        bundle_config.config["model_path"] = self.served_path()
        bundle_config.config["model_settings"] = "$sagan_model_settings(@model_path)"
        return bundle_config

    def _config_settings(self, path: str | None) -> dict[str, Any]:
        """The bundle config's ``model_settings`` of ``path``: the served model's settings (loading it if needed,
        e.g. while the task is built); for a file that is not served, the bundle's own reading."""
        real = os.path.realpath(path) if path else None
        for served in list(self._served.values()):
            if served.path == real:
                return served.settings
        if real is not None and real == self.served_path():
            return self._load(next(iter(self._served), "cpu")).settings
        return load_model_settings(path or "")

    def served_model(self, device: str = "cpu") -> ServedModel:
        """The served model on ``device``, reloaded when the file changed since the last call. The file is read
        once per version: another device gets a copy of the network already read.

        Raises:
            MONAILabelException: no model file, or one that cannot be loaded (names the file).
        """
        served, fresh = self._load_with_state(device)
        if fresh:
            # the bundle config's image size, thresholds, ... are those of this model: point it at this file
            # (setting an item also makes the next parse evaluate model_settings again, which gives these settings)
            self.bundle_config["model_path"] = served.path
        return served

    def _load(self, device: str) -> ServedModel:
        return self._load_with_state(device)[0]

    def _load_with_state(self, device: str) -> tuple[ServedModel, bool]:
        """``(served model on device, whether the file was read now)``; leaves the bundle config alone (this also
        runs while the config is being parsed)."""
        with self._lock:
            path = self.served_path()
            if path is None:
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"no SAGAN model: none of {self.model_paths} exists; train one (POST /train/sagan) first.",
                )
            mtime = os.stat(path).st_mtime_ns
            cached = self._served.get(device)
            if cached is not None and cached.path == path and cached.mtime_ns == mtime:
                return cached, False
            same = [s for s in self._served.values() if s.path == path and s.mtime_ns == mtime]
            if same:  # this file, already read for another device
                network = copy.deepcopy(same[0].network).to(torch.device(device)).eval()
                served = ServedModel(path, mtime, same[0].settings, network)
                self._served[device] = served
                return served, False
            for _ in range(3):  # a model published while it is read is read again
                mtime = os.stat(path).st_mtime_ns
                try:
                    settings, network = read_served_model(path)
                except Exception as e:
                    raise MONAILabelException(
                        MONAILabelError.MODEL_IMPORT_ERROR, f"{path}: cannot load the SAGAN model ({e})"
                    ) from e
                if os.stat(path).st_mtime_ns == mtime:
                    break
            network = network.to(torch.device(device)).eval()
            served = ServedModel(path, mtime, settings, network)
            self._served = {device: served}
            logger.info(f"serving {path} (iteration {settings.get('iteration')}, threshold {settings['threshold']})")
            return served, True

    def _slice_index(self, data: dict[str, Any], settings: dict[str, Any]) -> int | None:
        value = data.get("slice_index")
        if value is None or value == "":
            return settings.get("slice_index")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"slice_index must be an integer, got {value!r}"
            ) from None

    def _alpha(self, data: Mapping[str, Any], settings: Mapping[str, Any]) -> float | None:
        """The request's ``alpha`` (None when absent or empty), checked as ``run inferring`` checks it.

        Raises:
            MONAILabelException: INVALID_INPUT (HTTP 422) for an alpha that is not a number in (0, 1), or one for a
                model that stores no normal scores.
        """
        value = data.get("alpha")
        if value is None or value == "":
            return None
        try:
            if isinstance(value, bool):
                raise TypeError(value)
            alpha = float(value)
        except (TypeError, ValueError):
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT, f"alpha must be a number in (0, 1), got {value!r}"
            ) from None
        try:
            ConformalPValued(settings.get("normal_scores"), alpha)
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from None
        return alpha

    def _volume_items(
        self, data: Mapping[str, Any], slice_index: int | None, settings: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """The slice items of a 3D NIfTI volume to score slice by slice (:func:`bundle.volumes.expand_volumes`, along
        the model's ``slice_axis``, the last axis for models before 0.11), or ``None`` for any other input and
        whenever a ``slice_index`` (the request's or the model's) picks one slice.

        Raises:
            BadImageError: a volume none of whose slices holds enough foreground.
        """
        path = data.get("image")
        if slice_index is not None or not isinstance(path, str) or not os.path.isfile(path):
            return None
        axis = int(settings.get("slice_axis", -1))
        try:
            items = expand_volumes([{"image": path}], axis)
        except DatalistError:
            raise BadImageError(
                path,
                f"is a 3D volume none of whose slices holds enough foreground to score (at least "
                f"{FOREGROUND_SHARE:.0%} of its pixels above the 1st percentile + {FOREGROUND_LEVEL:.0%} of the "
                "intensity range)",
            ) from None
        return items if items and SLICE_INDEX_KEY in items[0] else None

    def _dicom_seg(self, data: Mapping[str, Any]) -> bool:
        """Whether the request asks for a DICOM SEG (``dicom_seg``), checked against the input.

        Raises:
            MONAILabelException: INVALID_INPUT for a value that is not a boolean, or without highdicom.
            BadImageError: the input is not a single DICOM image file (HTTP 422 naming it).
        """
        value = data.get("dicom_seg")
        if value in (None, "", False, 0) or str(value).lower() in ("false", "0"):
            return False
        if value not in (True, 1) and str(value).lower() not in ("true", "1"):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"dicom_seg must be true or false, got {value!r}")
        try:
            import highdicom  # noqa: F401
        except ImportError:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                "dicom_seg needs highdicom in the MONAI Label environment: run bash scripts/setup_monailabel.sh",
            ) from None
        path = data.get("image")
        if isinstance(path, str) and os.path.isdir(path):
            raise BadImageError(
                path,
                "is a DICOM series folder: dicom_seg (a DICOM SEG label) is made for a single DICOM image file only",
            )
        if not isinstance(path, str) or not os.path.isfile(path) or read_source_dicom(path) is None:
            raise BadImageError(str(path), "is not a DICOM image: dicom_seg (a DICOM SEG label) needs a DICOM input")
        return True

    def pre_transforms(self, data=None):
        served = self.served_model(str(data.get("device", "cpu")) if data else "cpu")
        slice_index = self._slice_index(data or {}, served.settings)
        alpha = self._alpha(data or {}, served.settings)
        dicom_seg = self._dicom_seg(data) if data else False
        items = self._volume_items(data, slice_index, served.settings) if data and not dicom_seg else None
        if data is not None:
            data["sagan_model"], data["sagan_slice_index"], data["sagan_alpha"] = served, slice_index, alpha
            data["sagan_dicom_seg"] = dicom_seg
        rest = list(super().pre_transforms(data))  # the bundle's preprocessing after its loader
        if items:
            return [LoadVolumeSlicesd(items, rest, "image", SLICES_KEY)]
        return [LoadSAGANImaged("image", slice_index), *rest]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """MONAI Label's inferer run; a volume's (S, 1, h, w) stack of slices runs as batches of the bundle's
        dataloader ``batch_size``, ``pred`` then (S, 1, h, w)."""
        if SLICES_KEY not in data:
            return super().run_inferer(data, convert_to_batch, device)
        stack = data[self.input_key]
        batch_size = max(1, int(self.bundle_config.config.get("dataloader", {}).get("batch_size", 32)))
        outputs = []
        for start in range(0, stack.shape[0], batch_size):
            chunk = {**data, self.input_key: stack[start : start + batch_size]}
            outputs.append(super().run_inferer(chunk, convert_to_batch=False, device=device)[self.output_label_key])
        data[self.output_label_key] = torch.cat([torch.as_tensor(o) for o in outputs])
        return data

    def _get_network(self, device, data):
        served = data.get("sagan_model") if data else None
        return served.network if served is not None else self.served_model(device).network

    def post_transforms(self, data=None):
        served: ServedModel = data["sagan_model"]
        slice_index, alpha = data.get("sagan_slice_index"), data.get("sagan_alpha")
        settings = served.settings
        # the bundle's postprocessing, its conformal step at the request's alpha (ConformalPValued decides abnormal
        # as p_value <= alpha, as run inferring --alpha)
        conformal = ConformalPValued(settings.get("normal_scores"), alpha)
        post = list(super().post_transforms(data))
        found = [i for i, t in enumerate(post) if isinstance(t, ConformalPValued)]
        if found:
            post[found[0]] = conformal
        else:
            post.append(conformal)
        if SLICES_KEY in data:
            volume = ScoreVolumeSlicesd(
                post,
                settings.get("threshold"),
                settings.get("pixel_threshold"),
                alpha,
                self.min_region_size,
                slices_key=SLICES_KEY,
            )
            return [volume, SAGANResultd(settings, None, alpha)]
        regions = AnomalyRegionsd(
            "heatmap",
            pixel_threshold=settings.get("pixel_threshold"),
            ref_key="image",
            slice_index=slice_index,
            min_size=self.min_region_size,
        )
        return [*post, regions, SAGANResultd(settings, slice_index, alpha)]

    def writer(self, data, extension=None, dtype=None):
        served = data.pop("sagan_model", None)
        data.pop(SLICES_KEY, None)
        if data.pop("sagan_dicom_seg", False):
            return self.write_dicom_seg(data, served)
        return super().writer(data, extension, dtype)

    def _identity(self, served: ServedModel) -> dict[str, str]:
        """:func:`bundle.transforms.dicom_output.model_identity` of the served model file (its sha256 computed once
        per version of the file)."""
        key = (served.path, served.mtime_ns)
        if key not in self._identities:
            self._identities = {key: model_identity(served.path)}
        return self._identities[key]

    def write_dicom_seg(self, data: dict[str, Any], served: ServedModel) -> tuple[str, dict[str, Any]]:
        """The label as a DICOM SEG (binary, one segment "Anomaly region") on the source DICOM image, as ``run
        inferring --output_format dicom`` writes it (:func:`bundle.transforms.dicom_output.build_segmentation`, the
        regions on the source's rows x columns by :func:`~bundle.transforms.dicom_output.source_grid_mask`; a
        multi-frame source gets every frame, the scored one labelled), in a temporary file that MONAI Label sends
        and deletes. The JSON gains ``dicom_seg``: the SEG's ``series_instance_uid`` and ``sop_instance_uid``.

        Raises:
            BadImageError: highdicom cannot build a SEG from the source's header (e.g. no PatientName, which
                highdicom 0.22 requires); HTTP 422 naming the file.
        """
        path = str(data["image_path"])
        source = read_source_dicom(path)
        if source is None:
            raise BadImageError(path, "is not a DICOM image: dicom_seg (a DICOM SEG label) needs a DICOM input")
        settings = served.settings
        rows, columns = int(source.Rows), int(source.Columns)
        frames = int(getattr(source, "NumberOfFrames", 1) or 1)
        frame = data.get("sagan_slice_index") if frames > 1 else None
        if settings.get("pixel_threshold") is None:
            mask = np.zeros((frames, rows, columns), np.uint8)  # no regions without a pixel threshold
        else:
            heatmap = torch.as_tensor(data["heatmap"]).detach().cpu()
            mask = source_grid_mask(
                heatmap, settings["pixel_threshold"], rows, columns, frames, frame, self.min_region_size
            )
        try:
            seg = build_segmentation(source, mask if frames > 1 else mask[0], self._identity(served))
        except Exception as e:  # highdicom refuses headers that lack what a SEG must copy
            raise BadImageError(path, f"cannot be the source of a DICOM SEG ({type(e).__name__}: {e})") from e
        fd, out = tempfile.mkstemp(suffix=".dcm", prefix="sagan_seg_")
        os.close(fd)
        seg.save_as(out)
        result = dict(data.get("result") or {})
        result["dicom_seg"] = {
            "series_instance_uid": str(seg.SeriesInstanceUID),
            "sop_instance_uid": str(seg.SOPInstanceUID),
        }
        return out, result
