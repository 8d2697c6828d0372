# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Choosing the checkpoint: by val AUC (labelled ``val``), by pseudo-AUC (no labels), or the last one.

A user usually has known-normal images and unlabeled images, but no labelled abnormal ones. The label-free
criterion holds out a seeded slice of the normal training set T_n and of the unlabeled training set T_u (neither
is trained on) and scores each checkpoint by how well its anomaly score separates them: the ROC AUC with the
held-out unlabeled images as pseudo-positives ("pseudo-AUC", the AUCp of Brainomaly, Siddiquee et al., WACV 2023,
the baseline of the paper's Table 3). The unlabeled images are a mix of normal and abnormal ones, so the
pseudo-AUC is lower than a true AUC, but a generator that separates abnormal images better separates the mix
better too. Its operating threshold comes from the held-out normal images.

``checkpoint_selection`` decides which model becomes ``models/model.pt``; the others are written beside it (see
:func:`model_filename`), so that one training run yields the val-AUC, pseudo-AUC and last generators.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from .atomic import save_torch_atomic
from .data import DatalistError, MedADDatalist, labelled_items, select_unlabeled
from .handlers.operating_point import OperatingPointHandler
from .settings import model_file_contents, read_model

__all__ = [
    "CHECKPOINT_SELECTIONS",
    "TrainingSets",
    "split_holdout",
    "training_sets",
    "pseudo_items",
    "spare_normals",
    "validation_items",
    "model_filename",
    "PseudoOperatingPoint",
    "BestModelSaver",
    "LastModelSaver",
]

logger = logging.getLogger(__name__)

CHECKPOINT_SELECTIONS = ("val_auc", "pseudo_auc", "last")


@dataclass
class TrainingSets:
    """The training streams after the pseudo-AUC hold-out, as absolute paths.

    ``normal`` / ``unlabeled``: what is trained on (T_n, T_u); ``held_normal`` / ``held_unlabeled``: the held-out
    images that score checkpoints (empty when nothing is held out).
    """

    normal: list[str]
    unlabeled: list[str]
    held_normal: list[str] = field(default_factory=list)
    held_unlabeled: list[str] = field(default_factory=list)

    @property
    def has_holdout(self) -> bool:
        """Whether a pseudo-AUC can be computed (both held-out sets are non-empty)."""
        return bool(self.held_normal and self.held_unlabeled)


def _check_selection(checkpoint_selection: str) -> None:
    if checkpoint_selection not in CHECKPOINT_SELECTIONS:
        raise ValueError(f"checkpoint_selection must be one of {CHECKPOINT_SELECTIONS}, got {checkpoint_selection!r}.")


def split_holdout(
    files: list[str], fraction: float, minimum: int, seed: int, stream: int = 0
) -> tuple[list[str], list[str]]:
    """Splits ``files`` into (kept, held out): ``max(minimum, round(fraction * len(files)))`` files are held out,
    drawn without replacement with ``seed`` (``stream`` gives independent draws for different lists); both parts
    keep the input order. ``fraction <= 0`` holds out nothing."""
    if fraction <= 0 or not files:
        return list(files), []
    if fraction >= 1:
        raise ValueError(f"pseudo_holdout must be a fraction in [0, 1), got {fraction}.")
    n_held = min(len(files), max(int(minimum), int(math.floor(fraction * len(files) + 0.5))))
    rng = np.random.default_rng([int(seed), int(stream)])
    held = set(rng.choice(len(files), n_held, replace=False).tolist())
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def training_sets(
    datalist: MedADDatalist,
    anomaly_ratio: float = 0.6,
    unlabeled_size: int | None = None,
    seed: int = 0,
    unlabeled_selection: str = "random",
    checkpoint_selection: str = "val_auc",
    holdout_fraction: float = 0.0,
    holdout_min: int = 10,
) -> TrainingSets:
    """T_n and T_u for training, with a pseudo-AUC hold-out taken from each.

    T_u is drawn first (:func:`bundle.data.select_unlabeled`), then ``holdout_fraction`` of T_n and of T_u (at
    least ``holdout_min`` images each) is held out with ``seed``, so the held-out unlabeled images have T_u's mix.
    Without unlabeled images (the "0_u" setting) nothing is held out.

    Raises:
        ValueError: an unknown ``checkpoint_selection``.
        DatalistError: a selection that the data set cannot support (``val_auc`` without ``val``; ``pseudo_auc``
            without a hold-out or unlabeled images; ``last`` with neither), or a hold-out that leaves fewer than
            2 normal or 1 unlabeled training images.
    """
    _check_selection(checkpoint_selection)
    json_path = os.path.join(datalist.root, "data.json")
    if checkpoint_selection == "val_auc" and not datalist.val:
        raise DatalistError(
            f"{json_path}: no 'val' split, which checkpoint_selection 'val_auc' needs. Add labelled val images "
            "(never select on 'test'), or choose checkpoints without labels: --checkpoint_selection pseudo_auc."
        )
    unlabeled = select_unlabeled(datalist, anomaly_ratio, unlabeled_size, seed, unlabeled_selection)
    if checkpoint_selection == "pseudo_auc" and (holdout_fraction <= 0 or not unlabeled):
        reason = "pseudo_holdout is 0" if holdout_fraction <= 0 else "there are no unlabeled training images"
        raise DatalistError(
            f"{json_path}: checkpoint_selection 'pseudo_auc' needs held-out normal and unlabeled images, but "
            f"{reason}; set --pseudo_holdout to a fraction such as 0.1 and train with unlabeled images."
        )
    if not unlabeled and holdout_fraction > 0:
        logger.warning("no unlabeled training images: nothing is held out and no pseudo-AUC is computed.")
        holdout_fraction = 0.0
    if checkpoint_selection == "last" and not datalist.val and holdout_fraction <= 0:
        raise DatalistError(
            f"{json_path}: checkpoint_selection 'last' needs labelled 'val' images or a pseudo-AUC hold-out "
            "(--pseudo_holdout 0.1) to choose the model's operating threshold."
        )
    normal, held_normal = split_holdout(datalist.normal, holdout_fraction, holdout_min, seed, stream=1)
    kept_unlabeled, held_unlabeled = split_holdout(unlabeled, holdout_fraction, holdout_min, seed, stream=2)
    if held_normal and (len(normal) < 2 or not kept_unlabeled):
        raise DatalistError(
            f"{json_path}: holding out {len(held_normal)} of {len(datalist.normal)} normal and {len(held_unlabeled)} "
            f"of {len(unlabeled)} unlabeled images leaves {len(normal)} normal and {len(kept_unlabeled)} unlabeled "
            "training images (at least 2 and 1 are needed); lower --pseudo_holdout or --pseudo_holdout_min."
        )
    if held_normal:
        logger.info(
            f"pseudo-AUC hold-out: {len(held_normal)} of {len(datalist.normal)} normal and {len(held_unlabeled)} of "
            f"{len(unlabeled)} unlabeled images are not trained on."
        )
    return TrainingSets(normal, kept_unlabeled, held_normal, held_unlabeled)


def pseudo_items(sets: TrainingSets) -> list[dict]:
    """Items ``{"image", "label", "filename"}`` of the hold-out: label 0 for the held-out normal images, 1 (pseudo
    positive) for the held-out unlabeled images; empty without a hold-out."""
    if not sets.has_holdout:
        return []
    return [{"image": f, "label": 0, "filename": f} for f in sets.held_normal] + [
        {"image": f, "label": 1, "filename": f} for f in sets.held_unlabeled
    ]


def spare_normals(datalist: MedADDatalist, sets: TrainingSets) -> list[str]:
    """Normal images of the training folder that a run with ``sets`` did not train on: the pseudo-AUC hold-out's
    normal images and the ``train/unlabeled/0`` images not drawn into T_u (the Med-AD layout labels the unlabeled
    pool so that T_u's anomaly ratio can be set). A threshold may be set on them besides the ``val`` normals
    (``scripts/calibrate_threshold.py``); never on ``test``."""
    drawn = set(sets.unlabeled) | set(sets.held_unlabeled)
    return list(sets.held_normal) + [f for f in datalist.unlabeled_normal if f not in drawn]


def validation_items(datalist: MedADDatalist, checkpoint_selection: str = "val_auc") -> list[dict]:
    """The labelled ``val`` items (see :func:`bundle.data.labelled_items`); empty when data.json has no ``val``
    and the checkpoint is chosen without it.

    Raises:
        DatalistError: no ``val`` with ``checkpoint_selection="val_auc"``, or a ``val`` with one class only."""
    _check_selection(checkpoint_selection)
    if not datalist.val and checkpoint_selection != "val_auc":
        return []
    if not datalist.val:
        raise DatalistError(
            f"{datalist.root}/data.json: no 'val' split, which checkpoint_selection 'val_auc' needs. Add labelled "
            "val images (never select on 'test'), or choose checkpoints without labels: "
            "--checkpoint_selection pseudo_auc."
        )
    return labelled_items(datalist, "val")


def model_filename(criterion: str, checkpoint_selection: str) -> str:
    """``model.pt`` for the model chosen by ``checkpoint_selection``, ``model_<criterion>.pt`` for the others
    (``model_val_auc.pt``, ``model_pseudo_auc.pt``, ``model_last.pt``)."""
    _check_selection(checkpoint_selection)
    _check_selection(criterion)
    return "model.pt" if criterion == checkpoint_selection else f"model_{criterion}.pt"


def _save_on_rank_zero(obj: dict, path: str) -> None:
    """``torch.save`` through :func:`~bundle.atomic.save_torch_atomic`, so a kill leaves the previous file
    readable. Under torch.distributed only rank 0 writes (all ranks hold the same weights)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_torch_atomic(obj, path)


class PseudoOperatingPoint(OperatingPointHandler):
    """:class:`~bundle.handlers.OperatingPointHandler` for the pseudo-AUC hold-out: the thresholds come from the
    held-out normal images (label 0). Label 1 marks unlabeled images, so no sensitivity is reported; the settings
    record ``threshold_source`` and ``holdout_specificity`` instead of ``val_specificity`` / ``val_sensitivity``,
    and nothing is added to the evaluator's metrics (its key metric ``val_pseudo_auc`` is what is logged)."""

    def _choose(self, engine: Engine) -> None:
        super()._choose(engine)
        for key in ("val_sensitivity", "val_specificity"):
            engine.state.metrics.pop(key, None)
        self.operating_point["holdout_specificity"] = self.operating_point.pop("val_specificity")
        self.operating_point.pop("val_sensitivity")
        self.operating_point["threshold_source"] = "held-out normal training images"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("holdout_specificity", "threshold_source"):
            if key in state:
                self.operating_point[key] = state[key]


class _ModelFileWriter:
    """Writes ``network`` in the ``models/model.pt`` format to ``save_dir/filename``: its state dict with
    ``settings.state_dict()``, the given extra settings and the ``record()`` of each training record given (one or a
    list: e.g. the :class:`~bundle.handlers.CriticStallDetector`, the :class:`~bundle.domain.DomainRecord`)."""

    def __init__(
        self, save_dir: str, filename: str, network: nn.Module, settings: Any, training_record: Any = None
    ) -> None:
        self.path = os.path.join(save_dir, filename)
        self.network = network
        self.settings = settings
        self.training_record = training_record

    def _write(self, **extra: Any) -> None:
        settings = {**self.settings.state_dict(), **extra}
        records = self.training_record if isinstance(self.training_record, (list, tuple)) else [self.training_record]
        for record in records:
            if record is not None:
                settings.update(record.record())
        _save_on_rank_zero(model_file_contents(self.network.state_dict(), settings), self.path)


class BestModelSaver(_ModelFileWriter):
    """Validation handler that writes the network's state dict with its settings (the ``models/model.pt`` format,
    :func:`bundle.settings.model_file_contents`) to ``save_dir/filename`` whenever the evaluator's ``metric_name``
    beats the best so far.

    The settings are ``settings.state_dict()`` (an operating-point handler) plus ``metric_name`` (its value),
    ``iteration`` (the trainer's) and ``selected_by``. With ``resume`` the best so far is read from an existing
    file (and from the training checkpoint, which carries :meth:`state_dict`), so a resumed run only replaces it
    with a better model.

    It only writes (``rank_zero_only``: in multi-GPU training only rank 0 attaches it).

    Args:
        save_dir, filename: where the model goes; written atomically (temporary file, rename).
        network: the generator.
        settings: object whose ``state_dict()`` gives the settings (e.g. :class:`PseudoOperatingPoint`).
        trainer: the training engine (for the iteration recorded).
        metric_name: the evaluator metric to maximise (``val_auc``, ``val_pseudo_auc``).
        resume: continue the best score of an existing file (a training checkpoint's ``state_dict`` also does).
        training_record: an object, or a list of them, whose ``record()`` is added to the settings (stall, domain).
    """

    def __init__(
        self,
        save_dir: str,
        filename: str,
        network: nn.Module,
        settings: Any,
        trainer: Engine | None = None,
        metric_name: str = "val_pseudo_auc",
        resume: bool = False,
        training_record: Any = None,
    ) -> None:
        super().__init__(save_dir, filename, network, settings, training_record)
        self.rank_zero_only = True
        self.trainer = trainer
        self.metric_name = metric_name
        self.best = -math.inf
        if resume and os.path.isfile(self.path):
            stored = read_model(self.path)[1] or {}
            self.best = float(stored.get(metric_name, -math.inf))
            logger.info(f"{self.path}: best {metric_name} so far {self.best:.4f} (resumed)")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, float]:
        """The best score so far, for the training checkpoint (an exact resume restores it)."""
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = float(state["best"])

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if not value > self.best:  # NaN never wins
            return
        self.best = value
        iteration = self.trainer.state.iteration if self.trainer is not None else None
        self._write(**{self.metric_name: value}, iteration=iteration, selected_by=self.metric_name)
        logger.info(f"saved {self.path} ({self.metric_name} {value:.4f} at iteration {iteration})")


class LastModelSaver(_ModelFileWriter):
    """Training handler that writes the final generator in the ``models/model.pt`` format when training completes
    (also after an early stop or the time limit).

    Its ``settings`` (operating thresholds) are those of the last pass of ``evaluator`` (the ``val`` evaluator, or
    the pseudo-AUC one without ``val``); when that pass was not at the final iteration (a stop between two
    validations), the evaluator is run once more on the final generator first. In multi-GPU training attach it on
    every rank (the evaluator may gather over ranks); only rank 0 writes.

    Args:
        save_dir, filename: where the model goes; written atomically.
        network: the generator.
        settings: object whose ``state_dict()`` gives the settings (the evaluator's operating-point handler).
        evaluator: the evaluator that fills ``settings``.
        training_record: an object, or a list of them, whose ``record()`` is added to the settings (stall, domain).
    """

    def __init__(
        self,
        save_dir: str,
        filename: str,
        network: nn.Module,
        settings: Any,
        evaluator: Engine,
        training_record: Any = None,
    ) -> None:
        super().__init__(save_dir, filename, network, settings, training_record)
        self.evaluator = evaluator
        self._validated_at: int | None = None
        self._trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._trainer = engine
        self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record)
        engine.add_event_handler(Events.COMPLETED, self)

    def _record(self, _: Engine) -> None:
        self._validated_at = self._trainer.state.iteration if self._trainer is not None else None

    def __call__(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        if self._validated_at != iteration:
            logger.info(f"validating the final generator (iteration {iteration}) for its operating point")
            self.evaluator.run(engine.state.epoch)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        self._write(iteration=iteration, selected_by="last")
        logger.info(f"saved {self.path} (the generator at iteration {iteration})")
