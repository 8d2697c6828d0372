# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Train tasks of the SAGAN MONAI Label app."""

from .sagan import SAGANTrainTask

__all__ = ["SAGANTrainTask"]
