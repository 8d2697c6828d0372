# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Infer tasks of the SAGAN MONAI Label app."""

from .sagan import SAGANInferTask

__all__ = ["SAGANInferTask"]
