# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Writing heat maps: a PNG for every input, and a NIfTI with the input's geometry for NIfTI and DICOM inputs; the
slices of a volume scored slice by slice are left to :class:`bundle.handlers.VolumeAggregator` (one 3D NIfTI)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImage

from .io import volume_slice

__all__ = ["SaveHeatmapd"]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom")


class SaveHeatmapd(MapTransform):
    """Saves ``key`` (a (1, H, W) heat map |x - x'| in [0, 2], a MetaTensor carrying the input's metadata) as
    ``<output_dir>/<input name>_heatmap.png`` (values clipped to [0, 1], scaled to 0..255) and, when the input
    was NIfTI or DICOM, also as ``<input name>_heatmap.nii.gz`` (float values, the affine of the 64x64 grid
    the model saw, i.e. the input's geometry resampled).

    A heat map of one slice of a volume scored slice by slice (metadata from
    :func:`~bundle.transforms.io.load_grayscale_slice`) is not written here: a PNG per slice would bury the results
    under files named alike, and :class:`bundle.handlers.VolumeAggregator` writes the volume's heat maps as one 3D
    NIfTI in its geometry. (An image that is the model's own ``slice_index`` of a volume is written as before.)"""

    def __init__(self, keys: str = "heatmap", output_dir: str = "outputs", postfix: str = "heatmap") -> None:
        super().__init__(keys)
        common = dict(output_dir=output_dir, output_postfix=postfix, separate_folder=False, print_log=False)
        self.png = SaveImage(output_ext=".png", writer="PILWriter", scale=255, output_dtype="uint8", **common)
        self.nifti = SaveImage(output_ext=".nii.gz", writer="NibabelWriter", resample=False, **common)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            heatmap = d[key]
            if not isinstance(heatmap, MetaTensor):
                raise TypeError(f"'{key}' must be a MetaTensor carrying the input's metadata to be saved.")
            if volume_slice(heatmap.meta) is not None:
                continue
            self.png(heatmap.clamp(0, 1))
            source = str(heatmap.meta.get("filename_or_obj", "")).lower()
            if source.endswith(VOLUME_SUFFIXES):
                self.nifti(heatmap)
        return d
