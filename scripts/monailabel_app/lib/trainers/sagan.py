# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The ``sagan`` train task: SAGAN's training sets from the datastore, the bundle's own training in the bundle's
environment, and publication of the new model to the infer task when it is better on the validation images."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from bundle.settings import generator_from_settings, load_model_settings
from bundle.transforms import BadImageError, load_grayscale

from ..datastore import image_class
from ..transforms import LoadSAGANImaged

__all__ = [
    "TrainingSplit",
    "SAGANTrainTask",
    "split_datastore",
    "trainable_reason",
    "training_schedule",
    "score_files",
    "publish_model",
]

logger = logging.getLogger(__name__)

PRESETS = {"demo": None, "cpu": "configs/presets/cpu.json", "paper": "configs/presets/paper.json"}
MAX_LISTED = 50  # skipped images listed by name in the training result (all are counted and logged)


@dataclass
class TrainingSplit:
    """Image files (absolute paths) of one training run: T_n (``normal``), T_u (``unlabeled``), and ``val``
    (``"0"``: held-out known-normal images, ``"1"``: known-abnormal images); ``skipped``: image id -> why training
    cannot use it (a DICOM series folder: the bundle trains on files; a file the bundle cannot read as a 2D image,
    e.g. a 3D volume without a slice rule)."""

    normal: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    val: dict[str, list[str]] = field(default_factory=lambda: {"0": [], "1": []})
    skipped: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "normal": len(self.normal),
            "unlabeled": len(self.unlabeled),
            "val_normal": len(self.val["0"]),
            "val_abnormal": len(self.val["1"]),
            "skipped": len(self.skipped),
        }


def trainable_reason(path: str, slice_index: int | None = None) -> str | None:
    """Why the bundle's training cannot use the image file ``path`` (None: it can): it decodes the file as the
    bundle does (:func:`bundle.transforms.load_grayscale` with the training's ``slice_index``), so a 3D volume
    without a slice rule, an unreadable or corrupt file, or a file of unusable size gives the bundle's reason."""
    if os.path.isdir(path):
        return "a DICOM series folder (training reads image files only)"
    try:
        load_grayscale(path, slice_index)
    except BadImageError as e:
        hint = ' (for training: --conf train_overrides "--slice_index K")' if "slice_index" in e.problem else ""
        return e.problem + hint
    except Exception as e:  # a reader's own error type: the bundle would stop on it as well
        return f"{type(e).__name__}: {e}"
    return None


def split_datastore(
    datastore: Datastore,
    min_normal: int,
    val_fraction: float,
    seed: int = 0,
    check: Callable[[str], str | None] | None = None,
) -> TrainingSplit:
    """Training sets from the datastore (see :func:`lib.datastore.image_class` for the normal/abnormal convention).

    Images that training cannot use are left out of every set and listed in ``skipped`` with the reason: DICOM
    series folders always, and the files for which ``check(path)`` gives a reason (e.g. :func:`trainable_reason`),
    each logged. Known-normal images: ``max(1, round(val_fraction * n))`` of them (drawn with ``seed``) are held out for
    validation, the rest is T_n. Known-abnormal images are validation images only. Unlabeled images are T_u.
    Validation picks the checkpoint (ROC AUC) and sets the model's thresholds on its normal images, so it needs
    both classes.

    Raises:
        MONAILabelException: fewer than ``min_normal`` usable known-normal images, or no usable known-abnormal
            image (the message counts the skipped ones).
    """
    split = TrainingSplit()
    normal, abnormal = [], []
    for image_id in sorted(datastore.list_images()):
        path = datastore.get_image_uri(image_id)
        reason = "a DICOM series folder (training reads image files only)" if os.path.isdir(path) else None
        if reason is None and check is not None:
            reason = check(path)
        if reason is not None:
            split.skipped[image_id] = reason
            logger.warning(f"not used for training: image {image_id} ({path}): {reason}")
            continue
        kind = image_class(datastore, image_id)
        (normal if kind == "normal" else abnormal if kind == "abnormal" else split.unlabeled).append(path)
    how = (
        'mark images with the image info {"sagan": "normal"} or "abnormal" (PUT /datastore/image/info), or '
        "submit a final label: empty = normal, with a region = abnormal"
    )
    usable = f" usable (besides {len(split.skipped)} skipped image(s), see the log)" if split.skipped else ""
    if len(normal) < max(min_normal, 2):
        raise MONAILabelException(
            MONAILabelError.APP_TRAIN_FAILED,
            f"SAGAN training needs at least {max(min_normal, 2)} known-normal images (conf min_normal_images); the "
            f"datastore has {len(normal)}{usable}: {how}.",
        )
    if not abnormal:
        raise MONAILabelException(
            MONAILabelError.APP_TRAIN_FAILED,
            "SAGAN training needs at least one known-abnormal image for validation (checkpoint choice by ROC AUC and "
            f"the decision to publish); the datastore has none{usable}: {how}.",
        )
    n_val = min(max(1, round(val_fraction * len(normal))), len(normal) - 1)
    held_out = set(np.random.default_rng(seed).choice(len(normal), n_val, replace=False).tolist())
    split.val["0"] = [p for i, p in enumerate(normal) if i in held_out]
    split.normal = [p for i, p in enumerate(normal) if i not in held_out]
    split.val["1"] = abnormal
    return split


def write_medad(split: TrainingSplit, root: str) -> str:
    """The split as a Med-AD folder (``root/images/`` links to the datastore files, ``root/data.json``): T_u goes to
    ``train/unlabeled/0`` and is used whole (``--anomaly_ratio 0 --unlabeled_size len(T_u)``)."""
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    names: dict[str, str] = {}

    def add(path: str) -> str:
        name = names.get(path)
        if name is None:
            name = f"{len(names):05d}_{os.path.basename(path)}"  # unique even for equal file names
            target = os.path.join(images, name)
            try:
                os.symlink(path, target)
            except OSError:
                shutil.copyfile(path, target)
            names[path] = name
        return name

    data = {
        "train": {"0": [add(p) for p in split.normal], "unlabeled": {"0": [add(p) for p in split.unlabeled], "1": []}},
        "val": {k: [add(p) for p in v] for k, v in split.val.items()},
    }
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(data, f, indent=1)
    return root


def score_files(bundle_path: str, model_path: str, files: list[str], device: str = "cpu") -> list[float]:
    """Anomaly scores in [0, 1] of ``files`` by the model in ``model_path``, through the bundle's own inference
    preprocessing (``configs/inference.json``) and scoring (mean |x - x'| / 2)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_path, "configs", "inference.json"))
    parser.config.update({"bundle_root": bundle_path, "model_path": model_path})
    settings = load_model_settings(model_path)
    pre = parser.get_parsed_content("preprocessing").transforms[1:]  # after the loader, as in the infer task
    network = generator_from_settings(settings)
    checkpoint = torch.load(model_path, map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))
    network = network.to(device).eval()
    loader = LoadSAGANImaged("image", settings.get("slice_index"))
    images = []
    for f in files:
        item = {"image": f}
        for t in [loader, *pre]:
            item = t(item)
        images.append(torch.as_tensor(item["image"]))
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            x = torch.stack(images[start : start + 32]).to(device)
            scores += ((x - network(x)).abs().mean(dim=(1, 2, 3)) / 2).tolist()
    return scores


def val_auc(bundle_path: str, model_path: str, val: dict[str, list[str]]) -> float:
    """ROC AUC of the model on ``val`` (``"0"`` normal, ``"1"`` abnormal)."""
    files = val["0"] + val["1"]
    labels = torch.tensor([0] * len(val["0"]) + [1] * len(val["1"]))
    scores = torch.tensor(score_files(bundle_path, model_path, files))
    return float(compute_roc_auc(scores, labels))


def _override_values(overrides: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` argument list (the last one wins)."""
    values: dict[str, str] = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            values[key] = value
        elif arg.startswith("--") and i + 1 < len(overrides):
            values[arg[2:]] = overrides[i + 1]
            i += 1
        i += 1
    return values


def _as_int(value: Any) -> int | None:
    """``value`` as an int when it is one (an int, or the text of one), else None (e.g. a ``$`` expression)."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def training_schedule(bundle_path: str, configs: list[str], overrides: list[str]) -> dict[str, int | None]:
    """``iterations``, ``val_interval`` and ``slice_index`` of a training run with the config files ``configs``
    (relative to the bundle, merged in order) and the command-line ``overrides``; None where the value is not a
    plain integer (an expression, or ``$None`` for ``slice_index``)."""
    merged = ConfigParser.load_config_files([os.path.join(bundle_path, c) for c in configs])
    merged.update(_override_values(overrides))
    return {k: _as_int(merged.get(k)) for k in ("iterations", "val_interval", "slice_index")}


def publish_model(source: str, target: str) -> None:
    """Copy ``source`` to ``target`` atomically: a reader sees the old file or the new one, never a part."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".model-", suffix=".pt", dir=os.path.dirname(target))
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class SAGANTrainTask(TrainTask):
    """Trains SAGAN on the datastore with the bundle's own training, in the bundle's environment.

    Steps: check the request's options (:meth:`check_request`), split the datastore (:func:`split_datastore`),
    leaving out, with a logged line each, the images the bundle cannot train on (:func:`trainable_reason`: 3D
    volumes without a ``--slice_index`` rule, unreadable files; counted in the result's ``sets.skipped`` and named
    in ``skipped``), write a Med-AD folder in a temporary work folder outside the bundle, run ``python -m
    monai.bundle run training --config_file "['configs/train.json', <preset>]" --on_bad_image skip`` with the
    bundle's ``.venv`` python (conf ``bundle_python``), score the new model and the served one on the same validation
    images, and publish the new model (atomic replace of ``published_path``) when its ROC AUC is higher (conf
    ``publish``: ``better``, the default, or ``always``). Ties keep the served model.

    Request parameters (Slicer shows them as training options; checked when the request arrives): ``preset``
    (``cpu``, ``paper``, ``demo`` or a config path relative to the bundle), ``iterations`` (0: the preset's; else a
    positive multiple of the preset's ``val_interval``), ``val_fraction`` (in (0, 1)), ``seed`` (an integer >= 0).
    """

    def __init__(
        self, bundle_path: str, published_path: str, served_path: Callable[[], str | None], conf: dict[str, str]
    ) -> None:
        super().__init__("SAGAN: known-normal + unlabeled images of the datastore, the bundle's training recipe")
        self.bundle_path = bundle_path
        self.published_path = published_path
        self.served_path = served_path
        self.python = conf.get("bundle_python") or os.path.join(bundle_path, ".venv", "bin", "python")
        self.min_normal = int(conf.get("min_normal_images", 20))
        self.overrides = shlex.split(conf.get("train_overrides", ""))
        self.work_dir = conf.get("work_dir") or None
        self.keep_work_dir = conf.get("keep_work_dir", "false").lower() == "true"
        self.publish = conf.get("publish", "better")
        if self.publish not in ("better", "always"):
            raise ValueError(f"conf publish must be 'better' or 'always', got {self.publish!r}.")
        self._config = {
            "preset": conf.get("train_preset", "cpu"),
            "iterations": 0,
            "val_fraction": float(conf.get("val_fraction", 0.2)),
            "seed": 0,
        }

    def config(self) -> dict[str, Any]:
        return self._config

    def stats(self) -> dict[str, Any]:
        path = os.path.join(os.path.dirname(self.published_path), "train_stats.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def _configs(self, preset: str) -> list[str]:
        preset_file = PRESETS.get(preset, preset)
        configs = ["configs/train.json"] + ([preset_file] if preset_file else [])
        for c in configs:
            if not os.path.isfile(os.path.join(self.bundle_path, c)):
                raise MONAILabelException(
                    MONAILabelError.INVALID_INPUT,
                    f"preset {preset!r}: no config file {c} in the bundle; use one of {', '.join(PRESETS)} or a "
                    "config path relative to the bundle",
                )
        return configs

    def check_request(self, request: dict[str, Any] | None) -> dict[str, Any]:
        """The training options of ``request`` over the defaults of :meth:`config`, checked and normalised
        (``preset`` str, ``iterations`` and ``seed`` int, ``val_fraction`` float), plus ``configs`` (the config
        files) and ``schedule`` (:func:`training_schedule` of the run).

        Raises:
            MONAILabelException: ``INVALID_INPUT`` naming the option and its rule: an unknown preset, ``iterations``
            not an integer >= 0 or not a positive multiple of the run's ``val_interval``, ``val_fraction`` outside
            (0, 1), ``seed`` not an integer >= 0.
        """
        options = {**self._config, **{k: v for k, v in (request or {}).items() if k in self._config}}

        def refuse(message: str) -> MONAILabelException:
            return MONAILabelException(MONAILabelError.INVALID_INPUT, f"training option {message}")

        preset = str(options["preset"])
        iterations, seed = _as_int(options["iterations"]), _as_int(options["seed"])
        if iterations is None or iterations < 0:
            raise refuse(f"iterations must be an integer >= 0 (0: the preset's), got {options['iterations']!r}")
        if seed is None or seed < 0:
            raise refuse(f"seed must be an integer >= 0, got {options['seed']!r}")
        try:
            val_fraction = float(options["val_fraction"])
        except (TypeError, ValueError):
            val_fraction = float("nan")
        if not 0 < val_fraction < 1:
            raise refuse(f"val_fraction must be a number in (0, 1), got {options['val_fraction']!r}")
        configs = self._configs(preset)
        overrides = self.overrides + (["--iterations", str(iterations)] if iterations > 0 else [])
        schedule = training_schedule(self.bundle_path, configs, overrides)
        total, interval = schedule["iterations"], schedule["val_interval"]
        if total is not None and interval is not None and (interval < 1 or total < interval or total % interval):
            step = max(interval, 1)
            choices = " or ".join(str(n) for n in dict.fromkeys([-(-total // step) * step, total // step * step]) if n)
            where = f"preset {preset!r}" + (" with conf train_overrides" if self.overrides else "")
            raise refuse(
                f"iterations ({total}) must be a positive multiple of val_interval ({interval}, from {where}): "
                f"use {choices or interval}"
            )
        return {
            "preset": preset,
            "iterations": iterations,
            "val_fraction": val_fraction,
            "seed": seed,
            "configs": configs,
            "schedule": schedule,
        }

    def _command(self, options: dict[str, Any], dataset: str, work: str, n_unlabeled: int) -> list[str]:
        cmd = [self.python, "-m", "monai.bundle", "run", "training", "--config_file", str(options["configs"])]
        cmd += ["--dataset_dir", dataset, "--ckpt_dir", os.path.join(work, "models")]
        cmd += ["--output_dir", os.path.join(work, "runs"), "--progress_bar", "False", "--on_bad_image", "skip"]
        cmd += ["--anomaly_ratio", "0", "--unlabeled_size", str(n_unlabeled), "--seed", str(options["seed"])]
        # the last of repeated options wins: train_overrides over the app's, the request's iterations over both
        return (
            cmd + self.overrides + (["--iterations", str(options["iterations"])] if options["iterations"] > 0 else [])
        )

    def _run_training(self, cmd: list[str]) -> None:
        if not os.path.isfile(self.python):
            raise MONAILabelException(
                MONAILabelError.APP_TRAIN_FAILED,
                f"{self.python}: the bundle's python is missing; run scripts/setup.sh or set conf bundle_python.",
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
        env["PYTHONPATH"] = self.bundle_path  # not the MONAI Label environment's paths
        logger.info(f"SAGAN training: {shlex.join(cmd)}")
        process = subprocess.Popen(
            cmd, cwd=self.bundle_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        # The cause: the first exception line after the first traceback header (a chained traceback prints the root
        # cause first, MONAI's config wrapper last); without a traceback, the first exception line at all.
        cause, first_error, in_traceback = "", "", False
        for line in process.stdout:
            line = line.rstrip()
            logger.info(f"[bundle] {line}")
            in_traceback = in_traceback or line.startswith("Traceback (most recent call last)")
            if re.match(r"[\w.]*(Error|Exception): ", line):
                first_error = first_error or line
                if in_traceback and not cause:
                    cause = line
        if process.wait() != 0:
            # one line: GET /train/ shows the last lines of the task's log, and the bundle's log is already above
            raise MONAILabelException(
                MONAILabelError.APP_TRAIN_FAILED,
                f"the bundle's training failed (exit {process.returncode}): "
                f"{cause or first_error or 'see the [bundle] lines of the log'}",
            )

    def __call__(self, request, datastore: Datastore):
        options = self.check_request(request)
        start = time.time()
        slice_index = options["schedule"]["slice_index"]
        split = split_datastore(
            datastore,
            self.min_normal,
            options["val_fraction"],
            options["seed"],
            check=lambda path: trainable_reason(path, slice_index),
        )
        if split.skipped:
            logger.warning(f"{len(split.skipped)} image(s) not used for training (the reasons are logged above)")
        logger.info(f"SAGAN training sets: {split.counts()}")
        work = tempfile.mkdtemp(prefix="sagan-train-", dir=self.work_dir)
        try:
            dataset = write_medad(split, os.path.join(work, "dataset"))
            self._run_training(self._command(options, dataset, work, len(split.unlabeled)))
            new_model = os.path.join(work, "models", "model.pt")
            if not os.path.isfile(new_model):
                raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, f"training wrote no {new_model}")
            new_auc = val_auc(self.bundle_path, new_model, split.val)
            served = self.served_path()
            served_auc = val_auc(self.bundle_path, served, split.val) if served else None
            publish = self.publish == "always" or served_auc is None or new_auc > served_auc
            if publish:
                publish_model(new_model, self.published_path)
            stats = {
                "published": publish,
                "model": self.published_path if publish else served,
                "val_auc": new_auc,
                "served_val_auc": served_auc,
                "sets": split.counts(),
                "skipped": dict(list(split.skipped.items())[:MAX_LISTED]),
                "seconds": round(time.time() - start, 1),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            logger.info(f"SAGAN training done: {stats}")
            os.makedirs(os.path.dirname(self.published_path), exist_ok=True)
            with open(os.path.join(os.path.dirname(self.published_path), "train_stats.json"), "w") as f:
                json.dump(stats, f, indent=1)
            return stats
        finally:
            if self.keep_work_dir:
                logger.info(f"work folder kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
