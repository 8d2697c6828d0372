# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Foreign patch interpolation (FPI), the pseudo anomaly SAGAN's generator learns to remove (SPEC.md)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["ForeignPatchInterpolationd"]


class ForeignPatchInterpolationd(Randomizable, MapTransform):
    """Blend one random square patch of a donor image into an image: ``(1 - alpha) * x + alpha * donor`` inside
    the patch, ``x`` outside.

    Per image: patch centre on each axis an integer uniform in ``[int(0.2 * S), int(0.8 * S))``, half-width an
    integer uniform in ``[round(0.05 * S), round(0.2 * S))`` (S = the shorter side), alpha ~ U[0, 1).
    At 64x64: centres 12..50, half-widths 3..12.

    Args:
        keys: the clean image key(s); each is a (C, H, W) tensor in [-1, 1].
        donor_key: key of the donor image, same shape, a different image of the normal set.
        output_key: where the pseudo-anomalous image goes (C, H, W), same range as the inputs.
        mask_key: where the binary patch mask goes (1, H, W), 1 inside the patch; ``None`` to skip.
        centre_range, half_width_range: fractions of the image side, as above.
    """

    def __init__(
        self,
        keys: KeysCollection,
        donor_key: str = "donor",
        output_key: str = "pseudo",
        mask_key: str | None = "pseudo_mask",
        centre_range: tuple[float, float] = (0.2, 0.8),
        half_width_range: tuple[float, float] = (0.05, 0.2),
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError("ForeignPatchInterpolationd takes exactly one image key.")
        self.donor_key = donor_key
        self.output_key = output_key
        self.mask_key = mask_key
        self.centre_range = centre_range
        self.half_width_range = half_width_range
        self.centre: tuple[int, int] = (0, 0)
        self.half_width = 0
        self.alpha = 0.0

    def randomize(self, spatial_size: tuple[int, int]) -> None:
        h, w = spatial_size
        lo, hi = self.centre_range
        self.centre = (
            int(self.R.randint(int(lo * h), int(hi * h))),
            int(self.R.randint(int(lo * w), int(hi * w))),
        )
        side = min(h, w)
        self.half_width = int(
            self.R.randint(round(self.half_width_range[0] * side), round(self.half_width_range[1] * side))
        )
        self.alpha = float(self.R.uniform(0.0, 1.0))

    def patch_mask(self, spatial_size: tuple[int, int]) -> torch.Tensor:
        """The current patch as a (1, H, W) float mask in {0, 1}."""
        (cy, cx), r = self.centre, self.half_width
        mask = torch.zeros((1, *spatial_size))
        mask[:, max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = 1.0
        return mask

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        key = self.keys[0]
        image, donor = torch.as_tensor(d[key]), torch.as_tensor(d[self.donor_key])
        if image.shape != donor.shape:
            raise ValueError(f"image {tuple(image.shape)} and donor {tuple(donor.shape)} differ in shape.")
        spatial = tuple(image.shape[-2:])
        self.randomize(spatial)
        mask = self.patch_mask(spatial).to(image)
        d[self.output_key] = image + mask * self.alpha * (donor - image)
        if self.mask_key is not None:
            d[self.mask_key] = mask
        return d
