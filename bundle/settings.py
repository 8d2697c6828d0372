# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""What a trained model carries: its network definition, preprocessing choices and operating thresholds.

``models/model.pt`` is the generator's plain state dict (parameter name -> tensor), the file every MONAI loader
expects: ``monai.bundle.load``, ``CheckpointLoader`` (strict or not), ``ckpt_export`` / ``verify_net_in_out`` without
``key_in_ckpt`` and MONAI Label's ``BundleInferTask`` all load the trained weights from it. The settings ride along
in the state dict's ``_metadata`` (PyTorch's own per-module metadata attribute, which ``torch.save`` keeps and
``load_state_dict`` ignores for unknown keys), under :data:`SETTINGS_KEY`; :func:`model_file_contents` writes that
and :func:`read_model` reads it back. Files of bundle <= 0.7 (``{"model": <state dict>, "settings": {...}}``) are
still read by :func:`read_model`; MONAI's loaders need ``key_in_ckpt="model"`` for them.

The settings hold:

- ``network_def``: ``{"_target_": "bundle.networks.SAGANGenerator", <constructor arguments>}``;
- ``image_size`` (side of the square model input), ``slice_index`` (slice of 3D inputs, or None) and
  ``slice_axis`` (the axis along which volumes are taken slice by slice; absent in models before 0.11: -1);
- ``threshold``: operating threshold on the anomaly score (``abnormal = score > threshold``), the
  ``specificity`` quantile of the scores of the normal ``val`` images;
- ``normal_scores``: the sorted scores of those normal images (at most 2000 order statistics), from which
  inference computes conformal p-values (:mod:`bundle.conformal`; absent in older models);
- ``pixel_threshold``: the ``pixel_quantile`` quantile of the smoothed heat maps of the normal ``val`` images
  (anomaly regions are where the smoothed heat map exceeds it);
- ``val_sensitivity`` / ``val_specificity`` at ``threshold``, ``iteration`` of the checkpoint, ``bundle_version``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import instantiate
from torch import nn

from . import networks

__all__ = [
    "DEFAULT_SETTINGS",
    "SETTINGS_KEY",
    "model_file_contents",
    "read_model",
    "CheckpointMismatchError",
    "network_def_of",
    "load_model_settings",
    "settings_from_model",
    "generator_from_settings",
    "infer_generator_hparams",
    "describe_mismatch",
]

logger = logging.getLogger(__name__)

# The demo preset of configs/train.json (a test keeps the two equal): used for a plain state dict's missing keys.
DEFAULT_SETTINGS: dict[str, Any] = {
    "network_def": {
        "_target_": "bundle.networks.SAGANGenerator",
        "in_channels": 1,
        "conv_dim": 8,
        "num_res_blocks": 3,
        "patches_per_side": 2,
        "position_code": True,
        "attention_gates": True,
        "keep_prob": 0.95,
        "position_code_after_norm": False,
    },
    "image_size": 64,
    "slice_index": None,
    "slice_axis": -1,
    "threshold": None,
    "specificity": None,
    "pixel_threshold": None,
    "pixel_quantile": None,
}


SETTINGS_KEY = "sagan_settings"


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the configured network; the message names the differing settings."""


def network_def_of(network: nn.Module) -> dict[str, Any]:
    """``{"_target_": "bundle.networks.<class>", **network.hparams}``: the config that rebuilds ``network``.

    Checks the generator contract (docs/design.md, "Adding a generator") where a model file is written: ``hparams``
    must be a dict of JSON values (the settings are stored in the model file and written into an exported
    ``inference.json``), and the class should be ``bundle.networks.<class>``, the only place
    :func:`generator_from_settings` builds from; a class defined elsewhere gets a warning (the weights are saved, but
    evaluation, inference, the export and MONAI Label cannot rebuild the generator).

    Raises:
        TypeError: ``network`` has no ``hparams``, or they are not a dict of JSON values.
    """
    name = type(network).__name__
    hparams = getattr(network, "hparams", None)
    if hparams is None:
        raise TypeError(f"{name} has no 'hparams': it cannot record its settings.")
    try:
        json.dumps(dict(hparams), allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}.hparams must be a dict of JSON values (the constructor arguments): {e}.") from e
    if getattr(networks, name, None) is not type(network) and name not in _WARNED_OUTSIDE:
        _WARNED_OUTSIDE.add(name)
        logger.warning(
            f"{type(network).__module__}.{name} is not bundle.networks.{name}: the model file names "
            f"bundle.networks.{name}, which evaluation, inference, the export and MONAI Label cannot build. Define "
            "the generator in bundle/networks/ and export it from bundle/networks/__init__.py (docs/design.md)."
        )
    return {"_target_": f"bundle.networks.{name}", **hparams}


_WARNED_OUTSIDE: set[str] = set()  # classes network_def_of has warned about (once each)


def model_file_contents(state_dict: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> OrderedDict:
    """What ``models/model.pt`` holds: a copy of ``state_dict`` (tensors only, so MONAI's loaders read it without
    ``key_in_ckpt``) whose ``_metadata[SETTINGS_KEY]`` is ``settings`` (plain values: str, int, float, bool, None,
    lists and dicts of those)."""
    contents = OrderedDict(state_dict)
    contents._metadata = OrderedDict(getattr(state_dict, "_metadata", None) or {})  # type: ignore[attr-defined]
    contents._metadata[SETTINGS_KEY] = dict(settings)  # type: ignore[attr-defined]
    return contents


def _read_checkpoint(model_path: str) -> Mapping:
    try:
        return torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # older (non-zip) serialisation cannot be memory-mapped
        return torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{model_path}: not a readable model checkpoint ({type(e).__name__}: {e}).") from e


def read_model(model_path: str) -> tuple[Mapping[str, torch.Tensor], dict[str, Any] | None]:
    """``(generator state dict, settings)`` of a model file; settings ``None`` when it records none (a plain state
    dict saved elsewhere). Reads the current format (:func:`model_file_contents`) and that of bundle <= 0.7
    (``{"model": state dict, "settings": {...}}``)."""
    checkpoint = _read_checkpoint(model_path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{model_path}: not a model state dict (found {type(checkpoint).__name__}).")
    if isinstance(checkpoint.get("model"), Mapping):  # bundle <= 0.7
        stored = checkpoint.get("settings")
        return checkpoint["model"], dict(stored) if isinstance(stored, Mapping) else None
    stored = (getattr(checkpoint, "_metadata", None) or {}).get(SETTINGS_KEY)
    return checkpoint, dict(stored) if isinstance(stored, Mapping) else None


def settings_from_model(state: Mapping[str, torch.Tensor], stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings of a model from the file's contents as :func:`read_model` returns them (so that a caller that
    also needs the weights reads the file once): :data:`DEFAULT_SETTINGS` updated with the recorded settings, or
    with the architecture inferred from the weights (:func:`infer_generator_hparams`) when the file records none."""
    settings = {**DEFAULT_SETTINGS, "network_def": dict(DEFAULT_SETTINGS["network_def"])}
    if stored is not None:
        settings.update(stored)
        settings["network_def"] = dict(stored.get("network_def", settings["network_def"]))
    elif state:
        settings["network_def"].update(infer_generator_hparams(state))
    return settings


def load_model_settings(model_path: str) -> dict[str, Any]:
    """The settings a trained model carries, with :data:`DEFAULT_SETTINGS` for whatever it does not record.

    A plain generator state dict (models of bundle 0.1) records nothing: its architecture is inferred from the
    weights (:func:`infer_generator_hparams`). A missing file gives the defaults (so that configs still parse,
    e.g. for ``verify_net_in_out``); loading the weights later fails with a clear message.
    """
    if not os.path.isfile(model_path):
        logger.info(f"{model_path} does not exist yet: using the default (demo) settings.")
        return settings_from_model({}, None)
    state, stored = read_model(model_path)
    settings = settings_from_model(state, stored)
    if stored is not None:
        source = "recorded in the model"
    else:
        source = "inferred from the weights (the model records no settings)"
    net = settings["network_def"]
    args = ", ".join(f"{k}={v}" for k, v in net.items() if k != "_target_")
    logger.info(
        f"{model_path}: {net['_target_'].rsplit('.', 1)[-1]}({args}), image_size {settings['image_size']}, "
        f"threshold {settings['threshold']}: {source}."
    )
    return settings


def generator_from_settings(settings: Mapping[str, Any]) -> nn.Module:
    """The generator described by ``settings["network_def"]`` (untrained; load the weights separately)."""
    network_def = dict(settings["network_def"])
    target = network_def.pop("_target_")
    if not re.fullmatch(r"bundle\.networks\.\w+", target):  # settings come from a file: build only our networks
        raise ValueError(f"model settings name the network {target!r}; only bundle.networks classes are built.")
    if not callable(getattr(networks, target.rsplit(".", 1)[1], None)):
        raise ValueError(
            f"model settings name the network {target!r}, which this bundle does not have: a generator must be "
            "defined in bundle/networks/ and exported from bundle/networks/__init__.py (docs/design.md)."
        )
    return instantiate(target, "default", **network_def)


def infer_generator_hparams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The SAGAN generator arguments that a state dict reveals: ``conv_dim``, ``num_res_blocks``,
    ``position_code``, ``attention_gates`` and, with position codes, ``patches_per_side`` (from the code width)."""
    if "stem.conv.weight" not in state_dict:
        return {}
    stem = state_dict["stem.conv.weight"]
    conv_dim, in_channels = int(stem.shape[0]), int(stem.shape[1])
    blocks = {m.group(1) for k in state_dict if (m := re.match(r"bottleneck\.(\d+)\.body\.", k))}
    hparams: dict[str, Any] = {
        "in_channels": in_channels,
        "conv_dim": conv_dim,
        "num_res_blocks": len(blocks),
        "position_code": any(k.startswith("down1.1.fuse") for k in state_dict),
        "attention_gates": any(k.startswith("gate1.") for k in state_dict),
    }
    if hparams["position_code"]:
        bits = int(state_dict["down1.1.fuse.conv.weight"].shape[1]) - 2 * conv_dim
        # floor(log2(N*N)) + 1 bits: N=1 -> 1, N=2 -> 3, N=4 -> 5, ...
        hparams["patches_per_side"] = next(n for n in range(1, 65) if (n * n).bit_length() == bits)
    return hparams


def describe_mismatch(model_path: str, network: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """One message naming the settings in which ``state_dict`` and ``network`` differ, and how to fix it."""
    configured = getattr(network, "hparams", {}) or {}
    found = infer_generator_hparams(state_dict)
    differing = [
        f"{k}: checkpoint {v}, configured {configured.get(k)}" for k, v in found.items() if configured.get(k) != v
    ]
    detail = "; ".join(differing) if differing else "the parameter names or shapes differ"
    return (
        f"{model_path} does not fit the configured generator {type(network).__name__} ({detail}). "
        "Evaluation and inference read the architecture from the model itself: remove architecture overrides "
        "(--conv_dim, --num_res_blocks, ..., or a preset / network_def override) from the command, or pass the "
        "values the model was trained with."
    )
