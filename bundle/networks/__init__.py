# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Networks of the SAGAN bundle: the SAGAN generator (paper, Fig. 2), its critic (paper, Sec. 3.1) and the
Brainomaly generator, the ablation baseline of the paper's Table 3 (Sec. 3.3)."""

from .blocks import IN_AFFINE, IN_PLAIN, conv_block, up_block
from .brainomaly import BrainomalyGenerator, BrainomalyResidualBlock, InstanceNormPerImage
from .critic import PatchDiscriminator, SAGANCritic
from .generator import (
    AttentionGate,
    DecoderResidualBlock,
    PositionalConditionEncoding,
    PositionBlock,
    ResidualBlock,
    SAGANGenerator,
    split_patches,
    stitch_patches,
)
