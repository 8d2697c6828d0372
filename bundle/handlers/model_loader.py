# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Loading a trained generator for evaluation and inference, with a readable error when it does not fit."""

from __future__ import annotations

import os
import pickle

import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from torch import nn

from ..settings import CheckpointMismatchError, describe_mismatch, read_model

__all__ = ["GeneratorLoader"]


class GeneratorLoader(CheckpointLoader):
    """``monai.handlers.CheckpointLoader`` for ``models/model.pt`` (a state dict carrying its settings, or the
    ``{"model": state dict, "settings": ...}`` of bundle <= 0.7) into ``network``. A missing file or a checkpoint
    that does not fit the network raises one message naming the file and the differing settings instead of
    PyTorch's state-dict dump.

    Raises:
        FileNotFoundError: no model at ``load_path``.
        ValueError: the file holds pickled code (refused, never run).
        CheckpointMismatchError: the weights do not fit ``network``.
    """

    def __init__(self, load_path: str, network: nn.Module, map_location: str | torch.device | None = None) -> None:
        super().__init__(load_path=load_path, load_dict={"model": network}, map_location=map_location)
        self.network = network

    def __call__(self, engine: Engine) -> None:
        if not os.path.isfile(self.load_path):
            raise FileNotFoundError(f"{self.load_path}: no trained model there; train one or pass --model_path.")
        try:
            super().__call__(engine)
        except pickle.UnpicklingError as e:  # weights_only=True met pickled code: never run it
            raise ValueError(
                f"{self.load_path}: refused: it holds pickled Python objects besides tensors and plain values "
                "(torch.load(weights_only=True)); load checkpoints only from sources you trust. "
                + str(e).splitlines()[0]
            ) from e
        except RuntimeError as e:
            if "state_dict" not in str(e):
                raise
            state, _ = read_model(self.load_path)
            raise CheckpointMismatchError(describe_mismatch(self.load_path, self.network, state)) from None
