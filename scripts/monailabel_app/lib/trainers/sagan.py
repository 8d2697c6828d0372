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

from ..datastore import image_class
from ..transforms import LoadSAGANImaged

__all__ = ["TrainingSplit", "SAGANTrainTask", "split_datastore", "score_files", "publish_model"]

logger = logging.getLogger(__name__)

PRESETS = {"demo": None, "cpu": "configs/presets/cpu.json", "paper": "configs/presets/paper.json"}


@dataclass
class TrainingSplit:
    """Image files (absolute paths) of one training run: T_n (``normal``), T_u (``unlabeled``), and ``val``
    (``"0"``: held-out known-normal images, ``"1"``: known-abnormal images); ``skipped``: ids that training cannot
    use (DICOM series folders: the bundle trains on files)."""

    normal: list[str] = field(default_factory=list)
    unlabeled: list[str] = field(default_factory=list)
    val: dict[str, list[str]] = field(default_factory=lambda: {"0": [], "1": []})
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "normal": len(self.normal),
            "unlabeled": len(self.unlabeled),
            "val_normal": len(self.val["0"]),
            "val_abnormal": len(self.val["1"]),
            "skipped": len(self.skipped),
        }


def split_datastore(datastore: Datastore, min_normal: int, val_fraction: float, seed: int = 0) -> TrainingSplit:
    """Training sets from the datastore (see :func:`lib.datastore.image_class` for the normal/abnormal convention).

    Known-normal images: ``max(1, round(val_fraction * n))`` of them (drawn with ``seed``) are held out for
    validation, the rest is T_n. Known-abnormal images are validation images only. Unlabeled images are T_u.
    Validation picks the checkpoint (ROC AUC) and sets the model's thresholds on its normal images, so it needs
    both classes.

    Raises:
        MONAILabelException: fewer than ``min_normal`` known-normal images, or no known-abnormal image.
    """
    split = TrainingSplit()
    normal, abnormal = [], []
    for image_id in sorted(datastore.list_images()):
        path = datastore.get_image_uri(image_id)
        if os.path.isdir(path):
            split.skipped.append(image_id)
            continue
        kind = image_class(datastore, image_id)
        (normal if kind == "normal" else abnormal if kind == "abnormal" else split.unlabeled).append(path)
    how = (
        'mark images with the image info {"sagan": "normal"} or "abnormal" (PUT /datastore/image/info), or '
        "submit a final label: empty = normal, with a region = abnormal"
    )
    if len(normal) < max(min_normal, 2):
        raise MONAILabelException(
            MONAILabelError.APP_TRAIN_FAILED,
            f"SAGAN training needs at least {max(min_normal, 2)} known-normal images (conf min_normal_images); the "
            f"datastore has {len(normal)}: {how}.",
        )
    if not abnormal:
        raise MONAILabelException(
            MONAILabelError.APP_TRAIN_FAILED,
            "SAGAN training needs at least one known-abnormal image for validation (checkpoint choice by ROC AUC and "
            f"the decision to publish); the datastore has none: {how}.",
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

    Steps: split the datastore (:func:`split_datastore`), write a Med-AD folder in a temporary work folder outside
    the bundle, run ``python -m monai.bundle run training --config_file "['configs/train.json', <preset>]"``
    with the bundle's ``.venv`` python (conf ``bundle_python``), score the new model and the served one on the same
    validation images, and publish the new model (atomic replace of ``published_path``) when its ROC AUC is higher
    (conf ``publish``: ``better``, the default, or ``always``). Ties keep the served model.

    Request parameters (Slicer shows them as training options): ``preset`` (``cpu``, ``paper``, ``demo`` or a
    config path relative to the bundle), ``iterations`` (0: the preset's), ``val_fraction``, ``seed``.
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

    def _command(self, request: dict[str, Any], dataset: str, work: str, n_unlabeled: int) -> list[str]:
        preset = str(request.get("preset", self._config["preset"]))
        preset_file = PRESETS.get(preset, preset)
        configs = ["configs/train.json"] + ([preset_file] if preset_file else [])
        for c in configs:
            if not os.path.isfile(os.path.join(self.bundle_path, c)):
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"preset {preset!r}: no config file {c}")
        cmd = [self.python, "-m", "monai.bundle", "run", "training", "--config_file", str(configs)]
        cmd += ["--dataset_dir", dataset, "--ckpt_dir", os.path.join(work, "models")]
        cmd += ["--output_dir", os.path.join(work, "runs"), "--progress_bar", "False"]
        cmd += ["--anomaly_ratio", "0", "--unlabeled_size", str(n_unlabeled), "--seed", str(int(request["seed"]))]
        if int(request.get("iterations") or 0) > 0:
            cmd += ["--iterations", str(int(request["iterations"]))]
        return cmd + self.overrides

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
        tail: list[str] = []
        cause = ""  # the first exception line: a chained traceback prints the root cause first, MONAI's wrapper last
        for line in process.stdout:
            line = line.rstrip()
            logger.info(f"[bundle] {line}")
            tail = (tail + [line])[-20:]
            if not cause and re.match(r"[\w.]*(Error|Exception): ", line):
                cause = line
        if process.wait() != 0:
            raise MONAILabelException(
                MONAILabelError.APP_TRAIN_FAILED,
                f"the bundle's training failed (exit {process.returncode}): {cause or 'see the log'}\n"
                + "\n".join(tail),
            )

    def __call__(self, request, datastore: Datastore):
        request = {**self._config, **(request or {})}
        start = time.time()
        split = split_datastore(datastore, self.min_normal, float(request["val_fraction"]), int(request["seed"]))
        if split.skipped:
            logger.warning(f"not used for training (DICOM series folders): {split.skipped}")
        logger.info(f"SAGAN training sets: {split.counts()}")
        work = tempfile.mkdtemp(prefix="sagan-train-", dir=self.work_dir)
        try:
            dataset = write_medad(split, os.path.join(work, "dataset"))
            self._run_training(self._command(request, dataset, work, len(split.unlabeled)))
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
