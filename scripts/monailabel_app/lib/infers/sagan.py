# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The ``sagan`` infer task: the bundle's own inference pipeline (``configs/inference.json``) with the model's
anomaly score, its abnormal/normal decision and the anomaly regions as a label image on the input's grid."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch
from monai.transforms import SaveImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from torch import nn

from bundle.settings import generator_from_settings, load_model_settings
from bundle.transforms import LoadGrayscaleImaged, SaveHeatmapd
from bundle.transforms.regions import MIN_REGION_SIZE, AnomalyRegionsd

from ..compat import placeholder_torchvision
from ..transforms import LABEL_VALUE, LoadSAGANImaged, SAGANResultd

with placeholder_torchvision():
    from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

__all__ = ["ServedModel", "SAGANInferTask"]

logger = logging.getLogger(__name__)


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
    at the next request. Architecture, image size, slice index and thresholds come from the model file
    (``bundle.settings.load_model_settings``). The bundle's post transform that writes heat-map files is dropped:
    nothing is written into the bundle folder.

    Request parameters: ``slice_index`` (which slice of a 3D input to score; default: the model's), and MONAI
    Label's usual ones (``device``, ``result_extension``, ...).

    Result: the label image (values {0, 1}, 1 = anomaly region) at the input's size and geometry, and JSON
    (``data["result"]``) with ``anomaly_score``, ``abnormal``, ``threshold``, ``p_value``, ``pixel_threshold``,
    ``regions`` (boxes in input pixel coordinates with their peak heat), ``slice_index``, ``model``.
    """

    def __init__(
        self, bundle_path: str, model_paths: list[str], conf: dict[str, str], min_region_size: int = MIN_REGION_SIZE
    ) -> None:
        self.model_paths = [os.path.realpath(p) for p in model_paths]
        self.min_region_size = min_region_size
        self._served: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        super().__init__(
            bundle_path,
            conf,
            const=_Constants(self),
            type=InferType.SEGMENTATION,
            pre_filter=[LoadGrayscaleImaged],  # replaced by LoadSAGANImaged, which also reads DICOM series folders
            post_filter=[SaveImaged, SaveHeatmapd],
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

    def _load_bundle_config(self, path, config):
        bundle_config = super()._load_bundle_config(path, config)
        bundle_config.config["model_path"] = self.served_path()
        return bundle_config

    def served_model(self, device: str = "cpu") -> ServedModel:
        """The served model on ``device``, reloaded when the file changed since the last call.

        Raises:
            MONAILabelException: no model file, or one that cannot be loaded (names the file).
        """
        with self._lock:
            path = self.served_path()
            if path is None:
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"no SAGAN model: none of {self.model_paths} exists; train one (POST /train/sagan) first.",
                )
            cached = self._served.get(device)
            if cached is not None and cached.path == path and cached.mtime_ns == os.stat(path).st_mtime_ns:
                return cached
            for _ in range(3):  # a model published between the reads below is read again
                mtime = os.stat(path).st_mtime_ns
                try:
                    settings = load_model_settings(path)
                    network = generator_from_settings(settings)
                    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
                    network.load_state_dict(checkpoint.get("model", checkpoint), strict=True)
                except Exception as e:
                    raise MONAILabelException(
                        MONAILabelError.MODEL_IMPORT_ERROR, f"{path}: cannot load the SAGAN model ({e})"
                    ) from e
                if os.stat(path).st_mtime_ns == mtime:
                    break
            network = network.to(torch.device(device)).eval()
            # the bundle config reads image size, thresholds, ... from the model file: point it at this one (setting
            # an item also makes the next parse read the file again)
            self.bundle_config["model_path"] = path
            served = ServedModel(path, mtime, settings, network)
            self._served = {device: served}
            logger.info(f"serving {path} (iteration {settings.get('iteration')}, threshold {settings['threshold']})")
            return served

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

    def pre_transforms(self, data=None):
        served = self.served_model(str(data.get("device", "cpu")) if data else "cpu")
        slice_index = self._slice_index(data or {}, served.settings)
        if data is not None:
            data["sagan_model"], data["sagan_slice_index"] = served, slice_index
        return [LoadSAGANImaged("image", slice_index), *super().pre_transforms(data)]

    def _get_network(self, device, data):
        served = data.get("sagan_model") if data else None
        return served.network if served is not None else self.served_model(device).network

    def post_transforms(self, data=None):
        served: ServedModel = data["sagan_model"]
        slice_index = data.get("sagan_slice_index")
        regions = AnomalyRegionsd(
            "heatmap",
            pixel_threshold=served.settings.get("pixel_threshold"),
            ref_key="image",
            slice_index=slice_index,
            min_size=self.min_region_size,
        )
        return [*super().post_transforms(data), regions, SAGANResultd(served.settings, slice_index)]

    def writer(self, data, extension=None, dtype=None):
        data.pop("sagan_model", None)
        return super().writer(data, extension, dtype)
