# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""SAGAN (Spatial-aware Attention GAN, MICCAI 2024) as a MONAI bundle."""

__version__ = "0.11.0"

from . import (  # noqa: E402
    acceleration,
    conformal,
    data,
    demo,
    domain,
    engines,
    handlers,
    losses,
    networks,
    pretrained,
    schedules,
    settings,
    transforms,
    visualize,
)
