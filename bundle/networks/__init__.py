from .blocks import IN_AFFINE, IN_PLAIN, conv_block, up_block
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
