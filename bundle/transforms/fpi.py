# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Foreign patch interpolation (FPI), the pseudo anomaly SAGAN's generator learns to remove (paper, Sec. 2.1:
the pseudo abnormal images x_p of Eq. 4)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import deprecated

__all__ = ["RandForeignPatchInterpolation", "RandForeignPatchInterpolationd", "ForeignPatchInterpolationd"]


class RandForeignPatchInterpolation(RandomizableTransform):
    """Blend one random square patch of a donor image into an image: ``(1 - alpha) * x + alpha * donor`` inside
    the patch, ``x`` outside.

    Per call: patch centre on each axis an integer uniform in ``[int(0.2 * S), int(0.8 * S))``, half-width an
    integer uniform in ``[round(0.05 * S), round(0.2 * S))`` (S = the shorter side), alpha ~ U[0, 1).
    At 64x64: centres 12..50, half-widths 3..12. With probability ``1 - prob`` the image is returned unchanged
    with an empty mask (``prob=1``, the paper's setting, draws no extra random number for it).

    ``__call__(img, donor)`` takes two (C, H, W) tensors of the same shape in [-1, 1] and returns
    ``(pseudo, mask)``: the pseudo-anomalous image (C, H, W), same range, and the patch mask (1, H, W) in {0, 1}.
    """

    def __init__(
        self,
        prob: float = 1.0,
        centre_range: tuple[float, float] = (0.2, 0.8),
        half_width_range: tuple[float, float] = (0.05, 0.2),
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        self.centre_range = centre_range
        self.half_width_range = half_width_range
        self.centre: tuple[int, int] = (0, 0)
        self.half_width = 0
        self.alpha = 0.0

    def randomize(self, spatial_size: tuple[int, int]) -> None:
        self._do_transform = self.prob >= 1.0 or self.R.rand() < self.prob
        if not self._do_transform:
            return
        h, w = spatial_size
        lo, hi = self.centre_range
        self.centre = (int(self.R.randint(int(lo * h), int(hi * h))), int(self.R.randint(int(lo * w), int(hi * w))))
        side = min(h, w)
        self.half_width = int(
            self.R.randint(round(self.half_width_range[0] * side), round(self.half_width_range[1] * side))
        )
        self.alpha = float(self.R.uniform(0.0, 1.0))

    def patch_mask(self, spatial_size: tuple[int, int]) -> torch.Tensor:
        """The current patch as a (1, H, W) float mask in {0, 1} (all zeros when the last draw applied nothing)."""
        mask = torch.zeros((1, *spatial_size))
        if self._do_transform:
            (cy, cx), r = self.centre, self.half_width
            mask[:, max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = 1.0
        return mask

    def __call__(
        self, img: torch.Tensor, donor: torch.Tensor, randomize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, donor = torch.as_tensor(img), torch.as_tensor(donor)
        if img.shape != donor.shape:
            raise ValueError(f"image {tuple(img.shape)} and donor {tuple(donor.shape)} differ in shape.")
        spatial = tuple(img.shape[-2:])
        if randomize:
            self.randomize(spatial)
        mask = self.patch_mask(spatial).to(img)
        return img + mask * self.alpha * (donor - img), mask


class RandForeignPatchInterpolationd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandForeignPatchInterpolation`: ``output_key`` = FPI(``keys``, ``donor_key``).

    Args:
        keys: the clean image key (exactly one); a (C, H, W) tensor in [-1, 1].
        donor_key: key of the donor image, same shape, a different image of the normal set.
        output_key: where the pseudo-anomalous image goes (C, H, W), same range as the inputs.
        mask_key: where the binary patch mask goes (1, H, W), 1 inside the patch; ``None`` to skip.
        prob: probability of pasting a patch (1.0 in the paper). As in MONAI's dictionary transforms, this
            transform draws whether to paste (from its own random state; ``prob=1`` draws nothing) and calls the
            array transform with ``randomize=False``; without a paste ``output_key`` is a copy of the image and
            the mask is empty.
        centre_range, half_width_range: fractions of the image side, see :class:`RandForeignPatchInterpolation`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        donor_key: str = "donor",
        output_key: str = "pseudo",
        mask_key: str | None = "pseudo_mask",
        prob: float = 1.0,
        centre_range: tuple[float, float] = (0.2, 0.8),
        half_width_range: tuple[float, float] = (0.05, 0.2),
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 1:
            raise ValueError("RandForeignPatchInterpolationd takes exactly one image key.")
        self.donor_key = donor_key
        self.output_key = output_key
        self.mask_key = mask_key
        self.fpi = RandForeignPatchInterpolation(1.0, centre_range, half_width_range)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandForeignPatchInterpolationd:
        """Seeds the patch draws with ``seed`` (or ``state``) and the paste decision with ``seed + 1``, so that
        the two streams of a seeded transform are not the same sequence."""
        super().set_random_state(None if seed is None else seed + 1, state)
        self.fpi.set_random_state(seed, state)
        return self

    def randomize(self, data: None = None) -> None:
        """Draws whether to paste; ``prob=1`` (the paper's setting) draws no random number for it."""
        self._do_transform = self.prob >= 1.0 or self.R.rand() < self.prob

    # the last draw, for inspection and tests
    centre = property(lambda self: self.fpi.centre)
    half_width = property(lambda self: self.fpi.half_width)
    alpha = property(lambda self: self.fpi.alpha)

    def __call__(self, data: Mapping[Hashable, torch.Tensor], randomize: bool = True) -> dict[Hashable, torch.Tensor]:
        """``data[keys]``, ``data[donor_key]``: (C, H, W) tensors of one shape; adds ``output_key`` (C, H, W) and
        ``mask_key`` (1, H, W). ``randomize=False`` reuses the last draws."""
        d = dict(data)
        img, donor = torch.as_tensor(d[self.keys[0]]), torch.as_tensor(d[self.donor_key])
        spatial = tuple(img.shape[-2:])
        if randomize:
            self.randomize()
            if self._do_transform:
                self.fpi.randomize(spatial)
        if self._do_transform:
            pseudo, mask = self.fpi(img, donor, randomize=False)
        else:
            pseudo, mask = img.clone(), img.new_zeros((1, *spatial))
        d[self.output_key] = pseudo
        if self.mask_key is not None:
            d[self.mask_key] = mask
        return d


@deprecated(since="0.2.0", msg_suffix="use RandForeignPatchInterpolationd.")
class ForeignPatchInterpolationd(RandForeignPatchInterpolationd):
    """Deprecated name of :class:`RandForeignPatchInterpolationd` (bundle 0.1)."""
