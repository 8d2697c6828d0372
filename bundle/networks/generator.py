# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""SAGAN generator (paper, Fig. 2): a patch-wise U-Net that turns an image into its healthy version.

- Additive map and output (paper, Sec. 2.1, Eqs. 1-2): the network predicts an additive map I(x); in training a
  per-pixel Bernoulli(p) mask delta gives G(x) = I(x) * delta + (1 - delta) * x, and x' = tanh(G(x) + x).
- Anatomical consistency module, ACM (paper, Sec. 2.2): the image is cut into N x N patches and each patch's
  binary position code is concatenated to its features (encoder and bottleneck), then fused by a 1x1 conv.
- Abnormal region restoration module, ARRM (paper, Sec. 2.3, Eqs. 8-9): attention gates filter the skip
  connections at each decoder level; the decoder outputs are upsampled, concatenated and fused into the
  additive map by multi-level feature fusion (paper, Sec. 2.3, last sentence; Fig. 2).

Faster versions of some layers (channels-last memory layout, fused kernels) live in :mod:`bundle.acceleration`, which
``place_network`` applies when a speed preset asks; this module is the method only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import require_bool
from .blocks import IN_PLAIN, conv_block, up_block

__all__ = [
    "PositionalConditionEncoding",
    "PositionBlock",
    "ResidualBlock",
    "DecoderResidualBlock",
    "AttentionGate",
    "SAGANGenerator",
    "NoPositionCode",
    "split_patches",
    "stitch_patches",
]


def split_patches(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) -> (B*n*n, C, H/n, W/n): non-overlapping patches, image-major, row-major per image
    (patch 0 = rows [0, H/n) x cols [0, W/n), patch 1 = same rows, next columns, ...)."""
    if n == 1:
        return x
    b, c, h, w = x.shape
    ph, pw = h // n, w // n
    x = x.reshape(b, c, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * n * n, c, ph, pw)


def stitch_patches(p: torch.Tensor, n: int) -> torch.Tensor:
    """Exact inverse of :func:`split_patches`: (B*n*n, C, h, w) -> (B, C, n*h, n*w)."""
    if n == 1:
        return p
    bp, c, ph, pw = p.shape
    b = bp // (n * n)
    p = p.reshape(b, n, n, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return p.reshape(b, c, n * ph, n * pw)


class PositionalConditionEncoding(nn.Module):
    """Binary position code of each patch, broadcast as constant feature maps (the ACM's input, paper, Sec. 2.2).

    With ``n`` patches per side there are ``n*n`` patches and ``floor(log2(n*n)) + 1`` bits; patch ``k``
    gets the binary digits of ``k``, most significant bit first (n = 2: 3 bits, patch 0 = [0, 0, 0], as in the
    paper). The paper writes the width as ceil(log2(N x N) + 1), the same number when N is a power of 2 (for
    other N it is one bit more). ``forward`` takes features (B*n*n, C, h, w) ordered as :func:`split_patches`
    makes them and returns (B*n*n, C + bits, h, w); ``positions`` ((P,) integer tensor, each patch's index k in
    [0, n*n)) gives the patches' positions when they are not whole images in that order.
    """

    def __init__(self, patches_per_side: int) -> None:
        super().__init__()
        num = patches_per_side * patches_per_side
        self.num_patches = num
        self.num_bits = int(math.floor(math.log2(num))) + 1
        codes = torch.tensor([[(k >> (self.num_bits - 1 - i)) & 1 for i in range(self.num_bits)] for k in range(num)])
        self.register_buffer("codes", codes.float(), persistent=False)

    def codes_for(self, num: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The (num, bits) codes of ``num`` patches: image-major order, or those of ``positions``."""
        if positions is None:
            return self.codes.repeat(num // self.num_patches, 1)
        return self.codes[positions]

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        bp, _, h, w = x.shape
        code = self.codes_for(bp, positions).to(x.dtype)
        return torch.cat([x, code[:, :, None, None].expand(bp, self.num_bits, h, w)], dim=1)


class PositionBlock(nn.Module):
    """ACM block (paper, Sec. 2.2): concatenate the position code, then 1x1 conv (bias) -> IN (no affine) -> ReLU
    back to C channels: (B*n*n, C, h, w) -> (B*n*n, C, h, w); ``positions`` as for
    :class:`PositionalConditionEncoding`.

    Note: the instance norm that follows the 1x1 conv subtracts each channel's mean over the patch, so it removes
    the code's contribution, and the conv's bias, up to float rounding: as specified, the block's output does not
    depend on the patch position (docs/performance.md, "Findings"). With ``after_norm=True`` (a documented
    deviation, off in the paper preset) the code's part of the 1x1 conv and the bias are added after the instance
    norm, before the ReLU, so that the position reaches the output; same parameters and state dict.
    """

    def __init__(self, channels: int, encoding: PositionalConditionEncoding, after_norm: bool = False) -> None:
        super().__init__()
        self.encoding = encoding
        self.after_norm = after_norm
        self.fuse = conv_block(channels + encoding.num_bits, channels, 1, bias=True, norm=IN_PLAIN)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.after_norm:
            c = x.shape[1]
            weight = self.fuse.conv.weight
            code = self.encoding.codes_for(x.shape[0], positions).to(x.dtype)
            per_patch = F.linear(code, weight[:, c:, 0, 0], self.fuse.conv.bias)  # (P, C)
            y = self.fuse.adn.N(F.conv2d(x, weight[:, :c])) + per_patch[:, :, None, None]
            return self.fuse.adn.A(y)
        return self.fuse(self.encoding(x, positions))


class NoPositionCode(nn.Module):
    """Stands where a :class:`PositionBlock` would be when the ACM is off: (P, C, h, w) -> the same tensor."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        return x


class ResidualBlock(nn.Module):
    """Bottleneck block: x + IN(conv3x3(ReLU(IN(conv3x3(x))))), convs without bias (StarGAN style)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(channels, channels, 3), conv_block(channels, channels, 3, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class DecoderResidualBlock(nn.Module):
    """Decoder block "RB1": s = ReLU(IN(conv3x3(x))) (cin -> cout); out = s + IN(conv3x3(s)); no final ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = conv_block(in_channels, out_channels, 3)
        self.refine = conv_block(out_channels, out_channels, 3, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.project(x)
        return s + self.refine(s)


class AttentionGate(nn.Module):
    """ARRM attention gate (paper, Sec. 2.3, Eqs. 8-9): psi = sigmoid(IN(conv1x1(ReLU(IN(conv1x1(gate)) +
    IN(conv1x1(skip)))))), returns skip * psi.

    In the paper's notation ``gate`` is f^l (the decoder feature, C_1) and ``skip`` is g^l (the skip connection,
    C_2), which Eq. 9 rescales by alpha = psi. ``gate`` (B, Cg, h, w) and ``skip`` (B, Cx, h, w) share the
    spatial size; the output has the skip's shape and psi is in (0, 1).
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_gate = conv_block(gate_channels, inter_channels, 1, bias=True, norm=IN_PLAIN, act=None)
        self.w_skip = conv_block(skip_channels, inter_channels, 1, bias=True, norm=IN_PLAIN, act=None)
        self.psi = conv_block(inter_channels, 1, 1, bias=True, norm=IN_PLAIN, act="sigmoid")

    def forward(self, gate: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip * self.psi(torch.relu(self.w_gate(gate) + self.w_skip(skip)))


class SAGANGenerator(nn.Module):
    """SAGAN generator (paper, Fig. 2). Default arguments are the paper preset (44,758,979 parameters).

    Args:
        in_channels: image channels (1, grey).
        conv_dim: base width; the encoder widths are conv_dim * (1, 2, 4, 8).
        num_res_blocks: residual blocks in the bottleneck.
        patches_per_side: N; the image is cut into N x N patches that go through the network as separate
            batch items (N=1: no split).
        position_code: use the anatomical consistency module (position code + position blocks).
        attention_gates: use the abnormal region restoration module; off = the plain skip is concatenated.
        keep_prob: probability p of the delta mask keeping the additive map in train mode (paper, Sec. 2.1,
            Eq. 1; 1.0 = no gating).
        position_code_after_norm: deviation (off = as published): add the position code's part of each position
            block after its instance norm, where it is not cancelled (:class:`PositionBlock`).

    ``forward`` takes (B, C, H, W) in [-1, 1], H and W divisible by 8*N, and returns the restored image, same
    shape, in (-1, 1). Train mode draws a new delta mask at every call; eval mode is deterministic.
    :meth:`forward_patches` does the same for patches that are already cut (every patch is a sample of its own:
    instance norm per patch, position code per patch index), which lets a caller leave out patches whose result
    it already has.

    ``hparams`` holds the constructor arguments (a JSON-able dict). The module scripts with ``torch.jit.script``;
    without attention gates ``gate1``..``gate3`` are ``None``.
    """

    # a dict of mixed value types has no TorchScript type; it is bookkeeping, not used by forward
    __jit_ignored_attributes__ = ["hparams"]

    def __init__(
        self,
        in_channels: int = 1,
        conv_dim: int = 64,
        num_res_blocks: int = 6,
        patches_per_side: int = 2,
        position_code: bool = True,
        attention_gates: bool = True,
        keep_prob: float = 0.95,
        position_code_after_norm: bool = False,
    ) -> None:
        super().__init__()
        self.hparams = {
            "in_channels": in_channels,
            "conv_dim": conv_dim,
            "num_res_blocks": num_res_blocks,
            "patches_per_side": patches_per_side,
            "position_code": position_code,
            "attention_gates": attention_gates,
            "keep_prob": keep_prob,
        }
        if position_code_after_norm:  # recorded only when on: models saved before the switch keep their settings
            self.hparams["position_code_after_norm"] = True
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}.")
        require_bool(
            position_code=position_code,
            attention_gates=attention_gates,
            position_code_after_norm=position_code_after_norm,
        )
        self.patches_per_side = patches_per_side
        self.keep_prob = keep_prob
        self.use_position_code = position_code
        self.use_attention_gates = attention_gates
        d1, d2, d4, d8 = conv_dim, conv_dim * 2, conv_dim * 4, conv_dim * 8
        enc = PositionalConditionEncoding(patches_per_side)
        self.encoding = enc

        def position_block(c: int) -> nn.Module:
            return PositionBlock(c, enc, position_code_after_norm) if position_code else NoPositionCode()

        # encoder
        self.stem = conv_block(in_channels, d1, 7)
        self.down1 = nn.Sequential(conv_block(d1, d2, 4, stride=2), position_block(d2))
        self.down2 = nn.Sequential(conv_block(d2, d4, 4, stride=2), position_block(d4))
        self.down3 = conv_block(d4, d8, 4, stride=2)
        # bottleneck
        self.bottleneck = nn.Sequential(position_block(d8), *[ResidualBlock(d8) for _ in range(num_res_blocks)])
        # decoder
        # None (no module, no state-dict entries) without gates; TorchScript prunes the `is not None` branches
        self.gate1 = AttentionGate(d8, d8, d8 // 2) if attention_gates else None
        self.gate2 = AttentionGate(d4, d4, d4 // 2) if attention_gates else None
        self.gate3 = AttentionGate(d2, d2, d2 // 2) if attention_gates else None
        self.dec1 = nn.Sequential(DecoderResidualBlock(2 * d8, d8), up_block(d8, d4))
        self.dec2 = nn.Sequential(DecoderResidualBlock(2 * d4, d4), up_block(d4, d2))
        self.dec3 = nn.Sequential(DecoderResidualBlock(2 * d2, d2), up_block(d2, d1))
        # multi-level feature fusion
        self.fuse1 = nn.Sequential(up_block(d4, d2), up_block(d2, d1))
        self.fuse2 = up_block(d2, d1)
        self.head = nn.Sequential(DecoderResidualBlock(3 * d1, d1), conv_block(d1, in_channels, 7, norm=None, act=None))

    def additive_map(self, p: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The additive map I(x) (paper, Eq. 1) for patches (B*N*N, C, h, w) -> (B*N*N, C, h, w), unbounded.
        ``positions``: see :meth:`forward_patches`."""
        y0 = self.stem(p)
        y1 = self.down1[1](self.down1[0](y0), positions)
        y2 = self.down2[1](self.down2[0](y1), positions)
        emb = self.bottleneck[0](self.down3(y2), positions)
        for i, block in enumerate(self.bottleneck):
            if i > 0:  # 0 is the position block, run above with the positions
                emb = block(emb)
        # without gates the plain skips are concatenated
        s1, s2, s3 = emb, y2, y1
        if self.gate1 is not None:
            s1 = self.gate1(emb, emb)
        out1 = self.dec1(torch.cat([emb, s1], dim=1))
        if self.gate2 is not None:
            s2 = self.gate2(out1, y2)
        out2 = self.dec2(torch.cat([out1, s2], dim=1))
        if self.gate3 is not None:
            s3 = self.gate3(out2, y1)
        out3 = self.dec3(torch.cat([out2, s3], dim=1))
        return self.head(torch.cat([self.fuse1(out1), self.fuse2(out2), out3], dim=1))

    def forward_patches(self, p: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """G on patches: (P, C, h, w) in [-1, 1] -> restored patches, same shape, in (-1, 1) (delta gating in
        train mode, as :meth:`forward`).

        ``positions`` ((P,) integer tensor): each patch's index k in [0, N*N) (row-major, as
        :func:`split_patches` orders them), for its position code; ``None`` means whole images in
        :func:`split_patches` order (P a multiple of N*N). The result for a patch depends only on that patch and
        its position, so ``forward(x) == stitch_patches(forward_patches(split_patches(x, N)), N)`` in eval mode.
        """
        m = self.additive_map(p, positions)
        if self.training and self.keep_prob < 1.0:
            delta = torch.rand_like(m) < self.keep_prob
            m = torch.where(delta, m, p)
        return torch.tanh(m + p)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> restored images, same shape, in (-1, 1); H and W divisible by 8*N.
        With ``positions`` ((P,) indices), ``x`` holds patches and this is :meth:`forward_patches` (the call a
        DistributedDataParallel wrapper must see to synchronise the gradients)."""
        if positions is not None:
            return self.forward_patches(x, positions)
        n = self.patches_per_side
        h, w = x.shape[-2:]
        if h % (8 * n) or w % (8 * n):
            raise ValueError(f"image size {h}x{w} must be divisible by 8*N = {8 * n}.")
        return stitch_patches(self.forward_patches(split_patches(x, n)), n)
