from .discriminator import PatchDiscriminator
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
