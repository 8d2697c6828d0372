# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The studies folder as a MONAI Label datastore of 2D images and DICOM series, and which of its images are
known normal or abnormal (the training convention of the SAGAN app)."""

from __future__ import annotations

import os

import numpy as np
from monai.transforms import LoadImage
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from .transforms import is_dicom_file

__all__ = ["IMAGE_EXTENSIONS", "INFO_KEY", "SAGANDatastore", "image_class"]

IMAGE_EXTENSIONS = ("*.png", "*.jpg", "*.jpeg", "*.bmp", "*.dcm", "*.nii", "*.nii.gz")
INFO_KEY = "sagan"  # image info key: "normal" or "abnormal"


class SAGANDatastore(LocalDatastore):
    """MONAI Label's local datastore, plus DICOM series: every sub-folder of the studies folder that holds DICOM
    files (not hidden, not the labels folder) is one image whose id is the folder name."""

    def _list_files(self, path, patterns):
        files = super()._list_files(path, patterns)
        if os.path.realpath(path) != os.path.realpath(self._datastore.image_path()):
            return files
        labels = os.path.realpath(self._datastore.label_path(None))
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.startswith(".") or not os.path.isdir(full) or os.path.realpath(full) == labels:
                continue
            if any(is_dicom_file(os.path.join(full, f)) for f in sorted(os.listdir(full))[:8]):
                files[name] = name
        return files


def _label_is_empty(path: str) -> bool:
    label = LoadImage(image_only=True)(path)
    return not bool(np.any(np.asarray(label) > 0))


def image_class(datastore: Datastore, image_id: str) -> str | None:
    """``"normal"``, ``"abnormal"`` or ``None`` (unlabeled) for one datastore image.

    The image info key ``sagan`` (``PUT /datastore/image/info?image=ID`` with ``info={"sagan": "normal"}``) wins;
    otherwise a saved ``final`` label (what a viewer's "submit label" stores) decides: an empty label (no
    foreground) means the image was reviewed and found normal, a label with foreground marks it abnormal.

    Raises:
        ValueError: an info value other than normal/abnormal, or an unreadable final label (names the image).
    """
    info = datastore.get_image_info(image_id) or {}
    value = info.get(INFO_KEY)
    if value is not None and str(value).strip() != "":
        tag = str(value).strip().lower()
        if tag not in ("normal", "abnormal"):
            raise ValueError(f"image {image_id}: info '{INFO_KEY}' is {value!r}; use 'normal' or 'abnormal'.")
        return tag
    label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
    if not label_id:
        return None
    path = datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)
    try:
        return "normal" if _label_is_empty(path) else "abnormal"
    except Exception as e:  # every reader raises its own type; the user needs the file and the reason
        raise ValueError(f"image {image_id}: its final label {path} cannot be read ({type(e).__name__}: {e}).") from e
