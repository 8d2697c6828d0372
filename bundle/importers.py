# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Importers that turn downloaded data sets into the Med-AD layout read by :func:`bundle.data.load_medad_datalist`.

``OUT/images/<file>.png`` plus ``OUT/data.json`` with ``train/0`` (T_n, known normals), ``train/unlabeled/{0,1}``
(the pools T_u is drawn from, or T_u itself), ``val/{0,1}`` and ``test/{0,1}``; names are relative to
``OUT/images``. ``OUT/labels.csv`` lists every image with its split, label, patient and source file, and
``OUT/import.json`` records the settings of the import.

Sources: the RSNA Pneumonia Detection Challenge (DICOM + ``stage_2_detailed_class_info.csv``), VinDr-CXR (DICOM +
``train.csv``), LAG (class folders of fundus JPEGs), and a generic source (folders or CSVs of the user's own splits).
The default split sizes are those of the paper's Table 1 (the Med-AD benchmark repartition): T_n, the unlabeled
pools and the test set; a labelled ``val`` set for checkpoint selection is carved out of the unlabeled pools (RSNA,
VinDr-CXR) or out of the test allocation (LAG, whose abnormal images the paper uses up: 900 in T_u at anomaly
ratio 0.6 plus 811 in test).

Every image is read with :func:`bundle.transforms.io.load_grayscale`, the reader of the bundle itself (rescale
slope/intercept, MONOCHROME1 inverted so that bright = dense, 12/16-bit min-max scaled, colour to grey), shrunk to
``size`` pixels on its short side and written as an 8-bit grey PNG: a DICOM given to the trained bundle at
inference is therefore read exactly as its training images were (up to the 8-bit rounding and the resize). The draw
is seeded; patients never straddle two splits where the source gives patient IDs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from monai.transforms import LoadImage
from PIL import Image

from .transforms.io import BadImageError, load_grayscale

__all__ = [
    "ImporterError",
    "Record",
    "ImportResult",
    "PAPER_SIZES",
    "read_rsna",
    "read_vindr",
    "read_lag",
    "read_generic",
    "check_dicom",
    "convert_image",
    "import_drawn",
    "import_fixed",
    "main",
]

# split sizes of the paper's Table 1: T_n, the unlabeled pools T_u is drawn from, and the test set
PAPER_SIZES: dict[str, dict[str, int]] = {
    "rsna": {
        "train_normal": 3851,
        "pool_normal": 4000,
        "pool_abnormal": 5012,
        "test_normal": 1000,
        "test_abnormal": 1000,
    },
    "vindr": {
        "train_normal": 4000,
        "pool_normal": 5606,
        "pool_abnormal": 3394,
        "test_normal": 1000,
        "test_abnormal": 1000,
    },
    "lag": {"train_normal": 1500, "pool_normal": 832, "pool_abnormal": 900, "test_normal": 811, "test_abnormal": 811},
}
DEFAULT_VAL_SIZE = 100
DEFAULT_VAL_FROM = {"rsna": "unlabeled", "vindr": "unlabeled", "lag": "test"}
SOURCE_NAMES = {"rsna": "RSNA Pneumonia", "vindr": "VinDr-CXR", "lag": "LAG", "generic": "generic"}
CHEST_MODALITIES = ("CR", "DX")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
SPLITS = ("test", "val", "train", "unlabeled")  # the order in which a drawn patient is offered to the splits
CHUNK = 256  # patients decoded per batch; a constant so that the draw does not depend on --workers
PARTIAL = ".import-partial"
OUTPUT_ENTRIES = ("images", "data.json", "labels.csv", "import.json")
RSNA_CLASSES = {"Normal": 0, "Lung Opacity": 1, "No Lung Opacity / Not Normal": 1}
RSNA_NOT_NORMAL = "No Lung Opacity / Not Normal"
VINDR_NORMAL = "No finding"


class ImporterError(ValueError):
    """Input that cannot be imported: the message names the file (or folder) and the problem."""


@dataclass
class Record:
    """One source image: its file, label (0 normal, 1 abnormal, None unknown), output name relative to
    ``OUT/images``, patient (None: not given) and, for the generic importer, the split the user gave."""

    source: str
    label: int | None
    name: str
    patient: str | None = None
    split: str | None = None


@dataclass
class ImportResult:
    """What an import wrote: ``splits[(split, label)]`` lists the records of ``train/0``, ``unlabeled/0|1``,
    ``val/0|1`` and ``test/0|1``; ``skipped`` holds (file, problem) of the bad files left out."""

    out: str
    splits: dict[tuple[str, int | None], list[Record]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unused: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- reading


def check_dicom(path: str, modalities: Sequence[str] | None = None) -> None:
    """Refuse a DICOM file that is not one 2D image: unreadable header, no pixel data (a structured report, a
    presentation state, ...), a modality outside ``modalities`` (None accepts any), or several frames.

    Raises:
        BadImageError: naming the file and the problem.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")  # the pixel data is not read here
    except InvalidDicomError as e:
        raise BadImageError(path, f"not a DICOM file ({e})") from e
    except Exception as e:  # truncated or corrupt header
        raise BadImageError(path, f"cannot read the DICOM header ({type(e).__name__}: {e})") from e
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", str(sop)) if sop else "unknown SOP class"
        raise BadImageError(path, f"has no pixel data: not an image ({kind}, modality {modality or 'not given'})")
    if modalities is not None and modality not in modalities:
        found = f"modality {modality!r}" if modality else "no Modality tag"
        raise BadImageError(
            path, f"has {found}; expected one of {', '.join(modalities)} (--modality any accepts every modality)"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageError(path, f"is a multi-frame DICOM ({frames} frames); one 2D image per file is needed")


def _is_dicom(path: str) -> bool:
    if path.lower().endswith((".dcm", ".dicom")):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


_LOADER: LoadImage | None = None


def _loader() -> LoadImage:
    """One MONAI LoadImage per process, configured as the bundle's (``bundle.transforms.io``)."""
    global _LOADER
    if _LOADER is None:
        from .transforms.io import _loader as make_loader

        _LOADER = make_loader()
    return _LOADER


def _shrink(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) float image in [0, 1] resized (Lanczos, antialiased) so that its short side is ``size``; never
    enlarged; ``size`` 0 keeps it."""
    h, w = image.shape
    if not size or min(h, w) <= size:
        return image
    scale = size / min(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.clip(np.asarray(Image.fromarray(image.astype(np.float32)).resize(shape, Image.Resampling.LANCZOS)), 0, 1)


def convert_image(source: str, dest: str, size: int = 256, modalities: Sequence[str] | None = None) -> tuple[int, int]:
    """Read ``source`` as the bundle does (:func:`bundle.transforms.io.load_grayscale`) and write it to ``dest`` as
    an 8-bit grey PNG whose short side is ``size`` (0: native size). Returns the written (H, W).

    Raises:
        BadImageError: the file is unreadable, not an image, of another modality, constant, or not 2D.
    """
    if _is_dicom(source):
        check_dicom(source, modalities)
    try:
        img = load_grayscale(source, loader=_loader())
    except BadImageError as e:
        if "plugin" in e.problem or "missing dependencies" in e.problem:  # compressed DICOM without a decoder
            raise BadImageError(
                source, e.problem + " (pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg adds decoders)"
            ) from e
        raise
    image = img[0].numpy().T  # load_grayscale gives MONAI's (x, y) order: back to (rows, columns)
    if image.max() <= image.min():
        raise BadImageError(source, "is a constant image (every pixel has the same value)")
    image = _shrink(image, size)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    Image.fromarray(np.round(image * 255.0).astype(np.uint8)).save(dest, format="PNG")
    return image.shape


def _convert_job(job: tuple[str, str, int, tuple[str, ...] | None]) -> tuple[str | None, tuple[int, int] | None]:
    source, dest, size, modalities = job
    try:
        return None, convert_image(source, dest, size, modalities)
    except BadImageError as e:
        return e.problem, None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _read_csv(path: str, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        raise ImporterError(f"{path}: CSV file not found.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ImporterError(f"{path}: not a readable CSV file ({e}).") from e
    _require_columns(path, columns, required)
    return columns, rows


def _require_columns(path: str, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ImporterError(f"{path}: column(s) {', '.join(missing)} missing; the columns are {', '.join(columns)}.")


def _image_files(folder: str, exclude: Sequence[str] = ()) -> list[str]:
    """Every image file under ``folder`` (recursively, sorted), skipping hidden entries and folders in ``exclude``."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude)
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _png_name(relative: str) -> str:
    stem = relative[: -len(".nii.gz")] if relative.lower().endswith(".nii.gz") else os.path.splitext(relative)[0]
    return stem.replace(os.sep, "/") + ".png"


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ImporterError(f"{path}: {what} folder not found.")


def read_rsna(images_dir: str, csv_path: str, not_normal: str = "exclude") -> tuple[list[Record], list[str]]:
    """Records of the RSNA Pneumonia Detection Challenge: ``images_dir/<patientId>.dcm`` labelled by
    ``stage_2_detailed_class_info.csv`` (patientId,class; one row per box, so IDs repeat). "Normal" is 0, "Lung
    Opacity" 1; "No Lung Opacity / Not Normal" is left out (``not_normal="exclude"``, the Med-AD repartition:
    8851 normal + 6012 lung-opacity images) or counted abnormal (``"abnormal"``). One image per patient.

    Returns:
        the records sorted by patient ID, and notes for the summary.
    """
    if not_normal not in ("exclude", "abnormal"):
        raise ValueError(f"not_normal must be 'exclude' or 'abnormal', got {not_normal!r}.")
    _require_dir(images_dir, "RSNA DICOM")
    columns, rows = _read_csv(csv_path, ())
    if "Target" in columns and "class" not in columns:
        raise ImporterError(
            f"{csv_path}: this is the box file (Target); pass stage_2_detailed_class_info.csv, whose 'class' column "
            "separates 'Normal' from 'No Lung Opacity / Not Normal'."
        )
    _require_columns(csv_path, columns, ("patientId", "class"))
    labels: dict[str, int | None] = {}
    for line, row in enumerate(rows, start=2):
        pid, cls = row["patientId"], row["class"]
        if cls not in RSNA_CLASSES:
            raise ImporterError(
                f"{csv_path}, line {line}: unknown class {cls!r}; expected one of {list(RSNA_CLASSES)}."
            )
        if not pid:
            raise ImporterError(f"{csv_path}, line {line}: empty patientId.")
        label = None if (cls == RSNA_NOT_NORMAL and not_normal == "exclude") else RSNA_CLASSES[cls]
        if pid in labels and labels[pid] != label:
            raise ImporterError(
                f"{csv_path}, line {line}: patient {pid} has class {cls!r} here and another class earlier."
            )
        labels[pid] = label
    excluded = sum(1 for v in labels.values() if v is None)
    listed = set(labels)
    on_disk = {f[: -len(".dcm")] for f in os.listdir(images_dir) if f.lower().endswith(".dcm")}
    records = [
        Record(os.path.join(images_dir, f"{pid}.dcm"), label, f"{pid}.png", patient=pid)
        for pid, label in sorted(labels.items())
        if label is not None
    ]
    notes = [f"{len(listed)} patients in {os.path.basename(csv_path)}, one image each; the patient ID is patientId."]
    if excluded:
        notes.append(
            f"{excluded} '{RSNA_NOT_NORMAL}' images left out, as in the Med-AD repartition "
            "(--not-normal abnormal counts them abnormal)."
        )
    if on_disk - listed:
        notes.append(f"{len(on_disk - listed)} DICOM files in {images_dir} are not in the CSV: ignored.")
    return records, notes


def read_vindr(images_dir: str, csv_path: str) -> tuple[list[Record], list[str]]:
    """Records of VinDr-CXR: ``images_dir/<image_id>.dicom`` labelled by the Kaggle ``train.csv`` (image_id,
    class_name, ..., rad_id: one row per finding of each reader) or PhysioNet's ``image_labels_train.csv`` (image_id,
    rad_id, one 0/1 column per label). An image is normal (0) only if every row of it says "No finding".
    VinDr-CXR gives no patient IDs: each image is treated as its own patient."""
    _require_dir(images_dir, "VinDr-CXR DICOM")
    columns, rows = _read_csv(csv_path, ("image_id",))
    if "class_name" in columns:
        normal_row = [row["class_name"] == VINDR_NORMAL for row in rows]
    elif VINDR_NORMAL in columns:
        normal_row = [row[VINDR_NORMAL] in ("1", "1.0") for row in rows]
    else:
        raise ImporterError(
            f"{csv_path}: neither a 'class_name' column (Kaggle train.csv) nor a '{VINDR_NORMAL}' column "
            f"(PhysioNet image_labels_train.csv); the columns are {', '.join(columns)}."
        )
    normal: dict[str, bool] = {}
    for line, (row, is_normal) in enumerate(zip(rows, normal_row), start=2):
        if not row["image_id"]:
            raise ImporterError(f"{csv_path}, line {line}: empty image_id.")
        normal[row["image_id"]] = normal.get(row["image_id"], True) and is_normal
    records = []
    for image_id, is_normal in sorted(normal.items()):
        path = os.path.join(images_dir, f"{image_id}.dicom")
        if not os.path.exists(path) and os.path.exists(os.path.join(images_dir, f"{image_id}.dcm")):
            path = os.path.join(images_dir, f"{image_id}.dcm")
        records.append(Record(path, 0 if is_normal else 1, f"{image_id}.png"))
    notes = [
        f"{len(normal)} images in {os.path.basename(csv_path)} ({len(rows)} rows); normal = every reader row says "
        f"'{VINDR_NORMAL}'.",
        "VinDr-CXR gives no patient IDs: every image is split as its own patient.",
    ]
    return records, notes


def read_lag(
    root: str,
    normal_dirs: Sequence[str] = ("non_glaucoma",),
    abnormal_dirs: Sequence[str] = ("suspicious_glaucoma", "glaucoma"),
    exclude_dirs: Sequence[str] = ("attention_map",),
) -> tuple[list[Record], list[str]]:
    """Records of LAG: every image under ``root/<normal dir>`` is 0, under ``root/<abnormal dir>`` 1 (recursively,
    skipping folders named in ``exclude_dirs``: LAG ships ophthalmologists' attention maps beside the images). Of the
    default folder names those present are used; at least one per class is required. No patient IDs."""
    _require_dir(root, "LAG")
    records, notes = [], []
    for label, names in ((0, normal_dirs), (1, abnormal_dirs)):
        present = [n for n in names if os.path.isdir(os.path.join(root, n))]
        if not present:
            raise ImporterError(
                f"{root}: none of the {'normal' if label == 0 else 'abnormal'} class folders {list(names)} is there "
                f"(found: {sorted(os.listdir(root))}); name them with --{'normal' if label == 0 else 'abnormal'}-dir."
            )
        for name in present:
            files = _image_files(os.path.join(root, name), exclude_dirs)
            if not files:
                raise ImporterError(f"{os.path.join(root, name)}: no images with a suffix in {IMAGE_SUFFIXES}.")
            records += [Record(f, label, _png_name(os.path.relpath(f, root))) for f in files]
            notes.append(f"{name}/: {len(files)} images, label {label}.")
    notes.append("LAG gives no patient IDs: every image is split as its own patient.")
    return records, notes


def _records_from(
    source: str, role: str, patient_column: str, label: int | None = None, need_label: bool = False
) -> list[Record]:
    """Records of a folder (every image in it) or a CSV (column ``path``, relative to the CSV's folder, optional
    ``label``, ``split`` and ``patient_column``)."""
    if os.path.isdir(source):
        return [
            Record(f, label, f"{role}/" + _png_name(os.path.relpath(f, source)), split=None)
            for f in _image_files(source)
        ]
    if not source.lower().endswith(".csv"):
        raise ImporterError(f"{source}: neither a folder nor a .csv file.")
    required = ("path", "label") if need_label else ("path",)
    columns, rows = _read_csv(source, required)
    base = os.path.dirname(os.path.abspath(source))
    records = []
    for line, row in enumerate(rows, start=2):
        if not row["path"]:
            raise ImporterError(f"{source}, line {line}: empty path.")
        path = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
        rel = os.path.relpath(path, base)
        rel = os.path.basename(path) if rel.startswith("..") else rel
        value = row.get("label", "")
        if value not in ("", "0", "1"):
            raise ImporterError(f"{source}, line {line}: label {value!r}; expected 0 (normal) or 1 (abnormal).")
        if need_label and value == "":
            raise ImporterError(f"{source}, line {line}: empty label; expected 0 or 1.")
        split = row.get("split", "") or None
        records.append(
            Record(
                path,
                int(value) if value != "" else label,
                f"{role}/" + _png_name(rel),
                patient=row.get(patient_column) or None,
                split=split,
            )
        )
    return records


def read_generic(
    normal: str, unlabeled: str | None = None, labelled: str | None = None, patient_column: str = "patient_id"
) -> tuple[list[Record], list[str]]:
    """Records of the user's own splits, each ``Record.split`` set.

    Args:
        normal: known normal images (T_n): a folder or a CSV with ``path`` (optional patient column).
        unlabeled: a folder of unlabeled images; a folder with subfolders ``0/`` and ``1/`` (labels known, as in
            Med-AD benchmarks); or a CSV with ``path`` and optional ``label``. Images of unknown label go to
            ``train/unlabeled/0``, which then means "unknown": train with ``--anomaly_ratio 0``.
        labelled: a folder with ``test/0``, ``test/1`` and optional ``val/0``, ``val/1``; or a CSV with ``path``,
            ``label`` and ``split`` (``val`` or ``test``).
        patient_column: the CSV column of patient IDs (optional).
    """
    records = list(_records_from(normal, "normal", patient_column, label=0))
    for r in records:
        if r.label != 0:
            raise ImporterError(f"{normal}: {r.source} has label {r.label}; the known normals must all be 0.")
        r.split = "train"
    notes = []
    if unlabeled:
        if os.path.isdir(unlabeled) and {"0", "1"} <= set(os.listdir(unlabeled)):
            unl = [
                Record(r.source, lab, r.name.replace("unlabeled/", f"unlabeled/{lab}/", 1), split="unlabeled")
                for lab in (0, 1)
                for r in _records_from(os.path.join(unlabeled, str(lab)), "unlabeled", patient_column)
            ]
        else:
            unl = _records_from(unlabeled, "unlabeled", patient_column)
        for r in unl:
            r.split = "unlabeled"
        if any(r.label is None for r in unl):
            notes.append(
                f"{sum(r.label is None for r in unl)} unlabeled images have no known label: they are listed under "
                "train/unlabeled/0, which here means 'unknown'; train with --anomaly_ratio 0 (T_u is then drawn "
                "from them alone)."
            )
        records += unl
    if labelled:
        if os.path.isdir(labelled):
            lab_records = []
            for split in ("val", "test"):
                for lab in (0, 1):
                    folder = os.path.join(labelled, split, str(lab))
                    if os.path.isdir(folder):
                        lab_records += [
                            Record(
                                f, lab, f"labelled/{split}/{lab}/" + _png_name(os.path.relpath(f, folder)), split=split
                            )
                            for f in _image_files(folder)
                        ]
            if not any(os.path.isdir(os.path.join(labelled, s)) for s in ("val", "test")):
                raise ImporterError(f"{labelled}: no 'test/0', 'test/1' (or 'val/0', 'val/1') subfolders.")
        else:
            _read_csv(labelled, ("path", "label", "split"))
            lab_records = _records_from(labelled, "labelled", patient_column, need_label=True)
            for line, r in enumerate(lab_records, start=2):
                if r.split not in ("val", "test"):
                    raise ImporterError(f"{labelled}, line {line}: split {r.split!r}; expected 'val' or 'test'.")
        records += lab_records
    if not any(r.patient for r in records):
        notes.append("no patient IDs given: every image is treated as its own patient.")
    return _unique_names(records), notes


def _unique_names(records: list[Record]) -> list[Record]:
    seen: Counter[str] = Counter()
    sources: dict[str, str] = {}
    for r in records:
        if r.source in sources:
            raise ImporterError(f"{r.source}: listed twice (as {sources[r.source]} and {r.name}).")
        sources[r.source] = r.name
        key = r.name.lower()
        if seen[key]:
            r.name = f"{r.name[:-4]}_{seen[key] + 1}.png"
        seen[key] += 1
    return records


# ---------------------------------------------------------------------------------------------------- writing


class _Workspace:
    """The output folder: refuses a non-empty one unless ``overwrite``, converts into ``OUT/.import-partial``,
    and publishes with data.json written last (temporary file + rename), so that a folder with data.json is always
    complete."""

    def __init__(self, out: str, inputs: Iterable[str], overwrite: bool) -> None:
        self.out = os.path.abspath(out)
        real_out = os.path.realpath(self.out)
        for path in inputs:
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_out]) in (real, real_out):
                raise ImporterError(f"{out}: the output folder overlaps the input {path}; choose a folder outside it.")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ImporterError(f"{out}: exists and is not a folder.")
        present = sorted(e for e in os.listdir(self.out) if e != PARTIAL) if os.path.isdir(self.out) else []
        if present and not overwrite:
            raise ImporterError(
                f"{out}: not empty ({', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); pass --overwrite "
                f"to replace {', '.join(OUTPUT_ENTRIES)} there, or choose a new folder."
            )
        self.staging = os.path.join(self.out, PARTIAL)
        shutil.rmtree(self.staging, ignore_errors=True)  # left by an interrupted run
        os.makedirs(os.path.join(self.staging, "images"))

    def path(self, name: str) -> str:
        return os.path.join(self.staging, "images", name)

    def discard(self, records: Iterable[Record]) -> None:
        for r in records:
            if os.path.exists(self.path(r.name)):
                os.remove(self.path(r.name))

    def publish(self, data: dict, rows: list[list[str]], info: dict) -> None:
        old = os.path.join(self.out, "data.json")
        if os.path.exists(old):
            os.remove(old)  # first: a half-replaced folder must not look complete
        for entry in ("images", "labels.csv", "import.json"):
            target = os.path.join(self.out, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.remove(target)
        os.replace(os.path.join(self.staging, "images"), os.path.join(self.out, "images"))
        with open(os.path.join(self.staging, "labels.csv"), "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([["file", "split", "label", "patient_id", "source"]] + rows)
        os.replace(os.path.join(self.staging, "labels.csv"), os.path.join(self.out, "labels.csv"))
        for name, content in (("import.json", info), ("data.json", data)):
            tmp = os.path.join(self.staging, name)
            with open(tmp, "w") as f:
                json.dump(content, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.out, name))
        shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if os.path.isdir(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)


class _Converter:
    """Decodes batches of records into the workspace, in order, with ``workers`` processes (1: in this process)."""

    def __init__(self, ws: _Workspace, size: int, modalities: Sequence[str] | None, workers: int) -> None:
        self.ws, self.size = ws, size
        self.modalities = tuple(modalities) if modalities is not None else None
        self.pool = None
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker)

    def __call__(self, records: list[Record]) -> list[str | None]:
        jobs = []
        for r in records:
            if not os.path.isfile(r.source):
                jobs.append(None)
            else:
                jobs.append((r.source, self.ws.path(r.name), self.size, self.modalities))
        todo = [j for j in jobs if j is not None]
        done = iter(self.pool.map(_convert_job, todo, chunksize=4) if self.pool else map(_convert_job, todo))
        return ["file not found" if j is None else next(done)[0] for j in jobs]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _bad_file(record: Record, problem: str, on_bad_file: str, skipped: list[tuple[str, str]]) -> None:
    if on_bad_file == "error":
        raise ImporterError(f"{record.source}: {problem} (--on-bad-file skip leaves such files out).")
    skipped.append((record.source, problem))


def _fits(counts: Counter, split: str, filled: Counter, targets: dict) -> bool:
    for label, n in counts.items():
        key = (split, label)
        if key not in targets or (targets[key] is not None and filled[key] + n > targets[key]):
            return False
    return True


def _place(counts: Counter, filled: Counter, targets: dict) -> str | None:
    return next((s for s in SPLITS if _fits(counts, s, filled, targets)), None)


def _groups(records: list[Record], seed: int) -> list[list[Record]]:
    """Records grouped by patient (an image without patient is its own group), in an order shuffled by ``seed``."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[f"p:{r.patient}" if r.patient else f"f:{r.name}"].append(r)
    keys = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(keys))
    return [sorted(by_patient[keys[i]], key=lambda r: r.name) for i in order]


def _draw(
    records: list[Record],
    targets: dict[tuple[str, int], int | None],
    seed: int,
    convert: Callable[[list[Record]], list[str | None]],
    on_bad_file: str,
    discard: Callable[[list[Record]], None],
    log: Callable[[str], None],
) -> tuple[dict[tuple[str, int], list[Record]], list[tuple[str, str]], int]:
    """Patients in seeded order, each decoded and then placed whole into the first split (test, val, train,
    unlabeled) with room for all its good images; a target None takes every image left."""
    placed: dict[tuple[str, int], list[Record]] = {k: [] for k in targets}
    filled: Counter = Counter()
    skipped: list[tuple[str, str]] = []
    unused = 0
    groups = iter(_groups(records, seed))
    total = sum(t if t is not None else 0 for t in targets.values())
    open_ended = any(t is None for t in targets.values())
    done_batches = 0
    while open_ended or any(filled[k] < t for k, t in targets.items() if t is not None):
        batch = list(islice(groups, CHUNK))
        if not batch:
            break
        # only patients that may still fit are decoded (the check uses the fill at the start of the batch)
        wanted = [g for g in batch if _place(Counter(r.label for r in g), filled, targets) is not None]
        unused += sum(len(g) for g in batch) - sum(len(g) for g in wanted)
        problems = iter(convert([r for g in wanted for r in g]))
        for group in wanted:
            good = []
            for r in group:
                problem = next(problems)
                if problem is None:
                    good.append(r)
                else:
                    _bad_file(r, problem, on_bad_file, skipped)
            split = _place(Counter(r.label for r in good), filled, targets) if good else None
            if split is None:
                discard(good)
                unused += len(good)
                continue
            for r in good:
                placed[(split, r.label)].append(r)
                filled[(split, r.label)] += 1
        done_batches += 1
        if done_batches % 8 == 0:
            log(f"  {sum(filled.values())} images placed" + (f" of {total}" if not open_ended else ""))
    unused += sum(len(g) for g in groups)
    return placed, skipped, unused


def _datalist(splits: dict[tuple[str, int | None], list[Record]]) -> dict:
    def names(key):
        return sorted(r.name for r in splits.get(key, []))

    data = {
        "train": {"0": names(("train", 0)), "unlabeled": {"0": names(("unlabeled", 0)), "1": names(("unlabeled", 1))}}
    }
    for split in ("val", "test"):
        if splits.get((split, 0)) or splits.get((split, 1)):
            data[split] = {"0": names((split, 0)), "1": names((split, 1))}
    return data


def _label_rows(splits: dict[tuple[str, int | None], list[Record]], unknown: set[str]) -> list[list[str]]:
    rows = []
    for (split, label), records in splits.items():
        for r in records:
            shown = "" if r.name in unknown else str(label)
            rows.append([r.name, split, shown, r.patient or "", r.source])
    return sorted(rows)


def _check_patients(splits: dict[tuple[str, int | None], list[Record]]) -> None:
    where: dict[str, set[str]] = defaultdict(set)
    for (split, _), records in splits.items():
        for r in records:
            if r.patient:
                where[r.patient].add(split)
    straddling = {p: s for p, s in where.items() if len(s) > 1}
    if straddling:
        shown = "; ".join(f"{p}: {', '.join(sorted(s))}" for p, s in sorted(straddling.items())[:10])
        raise ImporterError(f"{len(straddling)} patient(s) have images in more than one split ({shown}).")


def _tu_sizes(size: int, ratio: float) -> tuple[int, int]:
    n_abnormal = math.floor(ratio * size + 1e-9)  # as bundle.data.select_unlabeled
    return size - n_abnormal, n_abnormal


def import_drawn(
    source: str,
    records: list[Record],
    out: str,
    targets: dict[tuple[str, int], int | None],
    seed: int = 0,
    size: int = 256,
    on_bad_file: str = "error",
    modalities: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    scale_to_fit: bool = False,
    unlabeled: str = "pool",
    unlabeled_size: int | None = None,
    anomaly_ratio: float = 0.6,
    inputs: Sequence[str] = (),
    notes: Sequence[str] = (),
    settings: dict | None = None,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Draw the Med-AD splits from labelled ``records`` and write them to ``out``.

    Args:
        targets: images per (split, label) for ("test", 0|1), ("val", 0|1), ("train", 0), ("unlabeled", 0|1);
            None takes every image left. Patients are drawn in a ``seed``ed order and placed whole.
        scale_to_fit: when the source has too few images for the targets, scale every target by the same factor
            instead of refusing.
        unlabeled: "pool" writes the unlabeled pools (the bundle draws T_u at training with its anomaly ratio);
            "tu" writes T_u itself: ``unlabeled_size`` (default |T_n|) images at ``anomaly_ratio``.

    Raises:
        ImporterError: too few images (with the counts), a bad file with ``on_bad_file="error"``, a non-empty
            ``out`` without ``overwrite``.
    """
    if unlabeled not in ("pool", "tu"):
        raise ValueError(f"unlabeled must be 'pool' or 'tu', got {unlabeled!r}.")
    if not 0.0 <= anomaly_ratio <= 1.0:
        raise ImporterError(f"--anomaly-ratio must be in [0, 1], got {anomaly_ratio}.")
    for key, t in targets.items():
        if t is not None and t < 0:
            raise ImporterError(f"the size of {key[0]}/{key[1]} is negative ({t}).")
    notes = list(notes)
    available = Counter(r.label for r in records)
    needed = Counter()
    for (_, label), t in targets.items():
        needed[label] += t or 0
    factor = min([1.0] + [available[lab] / needed[lab] for lab in (0, 1) if needed[lab]])
    if factor < 1.0:
        parts = {lab: ", ".join(f"{s} {t}" for (s, lb), t in targets.items() if lb == lab and t) for lab in (0, 1)}
        counts = (
            f"{SOURCE_NAMES.get(source, source)} has {available[0]} normal and {available[1]} abnormal images; "
            f"the sizes need {needed[0]} normal ({parts[0]}) and {needed[1]} abnormal ({parts[1]})"
        )
        if not scale_to_fit:
            raise ImporterError(f"{inputs[0] if inputs else source}: {counts}. Lower the sizes or pass --scale-to-fit.")
        # a size that was not 0 keeps at least one image (val and test need both classes)
        targets = {k: (max(1, math.floor(t * factor)) if t else t) for k, t in targets.items()}
        if unlabeled_size is not None:
            unlabeled_size = math.floor(unlabeled_size * factor)
        notes.append(f"{counts}: every size scaled by {factor:.4f} (--scale-to-fit).")
    tu_size = targets[("train", 0)] if unlabeled_size is None else unlabeled_size
    tu_normal, tu_abnormal = _tu_sizes(tu_size, anomaly_ratio)
    pools = {lab: targets.get(("unlabeled", lab)) for lab in (0, 1)}
    short = [
        (lab, n, pools[lab])
        for lab, n in ((0, tu_normal), (1, tu_abnormal))
        if pools[lab] is not None and n > pools[lab]
    ]
    if short:
        lines = "; ".join(f"unlabeled/{lab} has {p} but {n} are needed" for lab, n, p in short)
        message = f"T_u of {tu_size} images at anomaly ratio {anomaly_ratio}: {lines}"
        if unlabeled == "tu":
            raise ImporterError(f"{message}. Lower --unlabeled-size or change the pool sizes.")
        notes.append(f"warning: {message}; train with a smaller --unlabeled_size or another --anomaly_ratio.")
    ws = _Workspace(out, inputs, overwrite)
    converter = _Converter(ws, size, modalities, workers if len(records) >= 500 else 1)
    try:
        log(f"importing {SOURCE_NAMES.get(source, source)}: {len(records)} candidate images, seed {seed}")
        placed, skipped, unused = _draw(records, targets, seed, converter, on_bad_file, ws.discard, log)
        missing = [(k, t, len(placed[k])) for k, t in targets.items() if t is not None and len(placed[k]) < t]
        if missing:
            lines = ", ".join(f"{s}/{lab}: {got} of {t}" for (s, lab), t, got in missing)
            raise ImporterError(
                f"{inputs[0] if inputs else source}: too few usable images after {len(skipped)} bad file(s) were "
                f"skipped ({lines}; the source has {available[0]} normal and {available[1]} abnormal). Lower the sizes "
                "(--unlabeled-normal all / --unlabeled-abnormal all take what is left for the pools)."
            )
        if unlabeled == "tu":
            rng = np.random.default_rng([seed, 1])
            for lab, n in ((0, tu_normal), (1, tu_abnormal)):
                pool = placed[("unlabeled", lab)]
                keep = set(rng.choice(len(pool), n, replace=False).tolist())
                ws.discard([r for i, r in enumerate(pool) if i not in keep])
                unused += len(pool) - n
                placed[("unlabeled", lab)] = [r for i, r in enumerate(pool) if i in keep]
            notes.append(
                f"train/unlabeled holds T_u itself ({tu_normal} normal + {tu_abnormal} abnormal); train with "
                f"--anomaly_ratio {anomaly_ratio} --unlabeled_size {tu_size}."
            )
        else:
            notes.append(
                f"train/unlabeled holds the pools; at training T_u = {tu_size} images at --anomaly_ratio "
                f"{anomaly_ratio} ({tu_normal} normal + {tu_abnormal} abnormal) is drawn from them."
            )
        _check_patients(placed)
        info = {"source": source, "seed": seed, "image_size": size, "unlabeled": unlabeled}
        info.update(settings or {})
        info.update({"targets": {f"{s}/{lab}": t for (s, lab), t in targets.items()}, "skipped": skipped})
        info["counts"] = {f"{s}/{lab}": len(v) for (s, lab), v in placed.items()}
        ws.publish(_datalist(placed), _label_rows(placed, set()), info)
    except BaseException:
        ws.abandon()
        raise
    finally:
        converter.close()
    result = ImportResult(ws.out, placed, skipped, unused, notes)
    log(summary(result))
    return result


def import_fixed(
    records: list[Record],
    out: str,
    val_size: int = 0,
    seed: int = 0,
    size: int = 256,
    on_bad_file: str = "error",
    modalities: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    inputs: Sequence[str] = (),
    notes: Sequence[str] = (),
    settings: dict | None = None,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Write records whose split the user gave (``Record.split``); when there is no val split, ``val_size`` normal
    + ``val_size`` abnormal test images are moved to val (whole patients, seeded).

    Raises:
        ImporterError: a patient in two splits, no known normals, too few test images for ``val_size``, a bad file
            with ``on_bad_file="error"``, a non-empty ``out`` without ``overwrite``.
    """
    notes = list(notes)
    if not any(r.split == "train" for r in records):
        raise ImporterError("no known normal images (train/0 would be empty).")
    unknown = {r.name for r in records if r.label is None}
    splits: dict[tuple[str, int | None], list[Record]] = defaultdict(list)
    for r in records:
        splits[(r.split, r.label if r.label is not None else 0)].append(r)
    _check_patients(splits)
    has_val = bool(splits.get(("val", 0)) or splits.get(("val", 1)))
    has_test = bool(splits.get(("test", 0)) or splits.get(("test", 1)))
    if not has_val and has_test and val_size > 0:
        test = splits.pop(("test", 0), []) + splits.pop(("test", 1), [])
        counts = Counter(r.label for r in test)
        if counts[0] < val_size or counts[1] < val_size:
            raise ImporterError(
                f"{inputs[-1] if inputs else 'labelled'}: no val split given and the test split has {counts[0]} normal "
                f"and {counts[1]} abnormal images; --val-size {val_size} takes {val_size} of each (lower it)."
            )
        targets = {("val", 0): val_size, ("val", 1): val_size, ("test", 0): None, ("test", 1): None}
        # SPLITS offers a patient to test first: draw val by giving test no room until val is full
        order = _groups(test, seed)
        filled: Counter = Counter()
        for group in order:
            c = Counter(r.label for r in group)
            split = "val" if _fits(c, "val", filled, targets) else "test"
            for r in group:
                splits[(split, r.label)].append(r)
                filled[(split, r.label)] += 1
        if filled[("val", 0)] < val_size or filled[("val", 1)] < val_size:
            raise ImporterError(f"could not draw {val_size} + {val_size} val images from the test split's patients.")
        _check_patients(splits)
        notes.append(f"no val split given: {val_size} normal + {val_size} abnormal test images moved to val.")
    elif not has_val:
        notes.append("no val split: training needs one to choose its checkpoint (give val/0, val/1 or a test split).")
    ws = _Workspace(out, inputs, overwrite)
    converter = _Converter(ws, size, modalities, workers if len(records) >= 500 else 1)
    skipped: list[tuple[str, str]] = []
    try:
        every = [r for rs in splits.values() for r in rs]
        log(f"importing {len(every)} images")
        problems = []
        for start in range(0, len(every), CHUNK * 4):
            problems += converter(every[start : start + CHUNK * 4])
            log(f"  {len(problems)} of {len(every)} images read")
        bad = set()
        for r, problem in zip(every, problems):
            if problem is not None:
                _bad_file(r, problem, on_bad_file, skipped)
                bad.add(r.name)
        splits = {k: [r for r in v if r.name not in bad] for k, v in splits.items()}
        if not splits.get(("train", 0)):
            raise ImporterError("no readable known normal image left (train/0 would be empty).")
        info = {"source": "generic", "seed": seed, "image_size": size, "val_size": val_size}
        info.update(settings or {})
        info.update({"skipped": skipped, "counts": {f"{s}/{lab}": len(v) for (s, lab), v in sorted(splits.items())}})
        info["unlabeled_labels"] = "unknown" if unknown else "known"
        ws.publish(_datalist(splits), _label_rows(splits, unknown), info)
    except BaseException:
        ws.abandon()
        raise
    finally:
        converter.close()
    result = ImportResult(ws.out, dict(splits), skipped, 0, notes)
    log(summary(result))
    return result


def summary(result: ImportResult) -> str:
    """The printed summary: images per split and label, skipped files, notes."""
    rows = [("train/0 (T_n)", ("train", 0)), ("train/unlabeled/0", ("unlabeled", 0))]
    rows += [("train/unlabeled/1", ("unlabeled", 1)), ("val/0", ("val", 0)), ("val/1", ("val", 1))]
    rows += [("test/0", ("test", 0)), ("test/1", ("test", 1))]
    lines = [f"wrote {result.out}/data.json and images/:"]
    lines += [f"  {name:<20}{len(result.splits.get(key, [])):>7}" for name, key in rows]
    lines.append(f"  {'total':<20}{sum(len(v) for v in result.splits.values()):>7}")
    if result.unused:
        lines.append(f"  {result.unused} images of the source not needed by the sizes (not written)")
    lines.append(f"  {len(result.skipped)} bad files skipped" + (":" if result.skipped else ""))
    for path, problem in result.skipped[:20]:
        lines.append(f"    {path}: {problem}")
    if len(result.skipped) > 20:
        lines.append(f"    ... and {len(result.skipped) - 20} more (all listed in import.json)")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command line

_DICOM_HELP = (
    "Images are written as 8-bit grey PNG (--size px on the short side, aspect kept) through the bundle's own "
    "reader bundle.transforms.io.load_grayscale: rescale slope/intercept, MONOCHROME1 inverted (bright = dense), "
    "12/16-bit min-max scaled, as the Med-AD preprocessing does, with no VOI LUT/windowing, so a DICOM given to the "
    "trained bundle reads like its training images. Why convert: the bundle decodes every training image at "
    "start-up (a 1024x1024 DICOM costs about 3x a 256 px PNG to decode and resize; VinDr-CXR DICOMs are about "
    "2-3k px and 200 GB in all); 256 px PNGs are ~40x smaller; at the 64x64 model input 8 bits and 256 px lose "
    "nothing the model sees; and the import happens once, recorded in import.json and labels.csv."
)


def _size_arg(value: str) -> int | str:
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def _count_arg(value: str) -> int:
    n = _size_arg(value)
    if n == "all":
        raise argparse.ArgumentTypeError("'all' is only accepted for the unlabeled pools")
    return n


def _modality_arg(value: str) -> tuple[str, ...] | None:
    return None if value.lower() == "any" else tuple(m.strip().upper() for m in value.split(",") if m.strip())


def _common(parser: argparse.ArgumentParser, modality_default: str) -> None:
    g = parser.add_argument_group("output and reading")
    g.add_argument(
        "--out", required=True, help="output folder (new or empty): images/, data.json, labels.csv, import.json"
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace images/, data.json, labels.csv, import.json in --out"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the draw; the same seed and inputs give the same files")
    g.add_argument(
        "--size",
        type=_count_arg,
        default=256,
        help="short side of the written PNGs in pixels, never enlarged; 0 keeps the "
        "native size (default 256; the model input is 64x64)",
    )
    g.add_argument(
        "--on-bad-file",
        choices=("error", "skip"),
        default="error",
        help="a bad file (missing, unreadable, no pixel data, non-image DICOM, wrong modality, constant, not 2D): "
        "stop naming it (error, default) or leave it out, counted and listed in the summary and import.json (skip)",
    )
    g.add_argument(
        "--modality",
        type=_modality_arg,
        default=_modality_arg(modality_default),
        help=f"DICOM Modality values accepted, comma-separated, or 'any' (default {modality_default})",
    )
    g.add_argument(
        "--workers",
        type=_count_arg,
        default=min(8, os.cpu_count() or 1),
        help="decoding processes (default min(8, CPUs); 1 below 500 images, as each process needs seconds to "
        "start); the result does not depend on it",
    )


def _sizes(parser: argparse.ArgumentParser, source: str) -> None:
    p = PAPER_SIZES[source]
    g = parser.add_argument_group(
        "split sizes (defaults: the paper's Table 1 / the Med-AD repartition)",
        f"T_n {p['train_normal']}; unlabeled pools {p['pool_normal']} normal + {p['pool_abnormal']} abnormal; test "
        f"{p['test_normal']} + {p['test_abnormal']}; val {DEFAULT_VAL_SIZE} + {DEFAULT_VAL_SIZE} taken from the "
        f"{DEFAULT_VAL_FROM[source]} allocation (--val-from). Patients are drawn in a seeded order and placed whole "
        "into test, then val, then T_n, then the pools.",
    )
    g.add_argument(
        "--train-normal", type=_count_arg, help=f"T_n, known normal training images (default {p['train_normal']})"
    )
    g.add_argument("--unlabeled-normal", type=_size_arg, help="normal images in the unlabeled pool, or 'all' left")
    g.add_argument("--unlabeled-abnormal", type=_size_arg, help="abnormal images in the unlabeled pool, or 'all' left")
    g.add_argument(
        "--test-size", type=_count_arg, help="test images per class (sets both --test-normal and --test-abnormal)"
    )
    g.add_argument("--test-normal", type=_count_arg)
    g.add_argument("--test-abnormal", type=_count_arg)
    g.add_argument("--val-size", type=_count_arg, help=f"val images per class (default {DEFAULT_VAL_SIZE})")
    g.add_argument("--val-normal", type=_count_arg)
    g.add_argument("--val-abnormal", type=_count_arg)
    g.add_argument(
        "--val-from",
        choices=("unlabeled", "test"),
        default=DEFAULT_VAL_FROM[source],
        help="which paper allocation (unless its size is given) shrinks by the val images; default "
        f"{DEFAULT_VAL_FROM[source]}"
        + (
            ": LAG's 1711 abnormal images are all used by the paper (900 in T_u at ratio 0.6 + 811 test), so "
            "taking val from the pool would leave T_u short"
            if source == "lag"
            else ""
        ),
    )
    g.add_argument(
        "--scale-to-fit",
        action="store_true",
        help="when the source has fewer images than the sizes need, scale every size by the same factor "
        "(default: refuse, giving the counts)",
    )
    t = parser.add_argument_group("unlabeled set T_u")
    t.add_argument(
        "--unlabeled",
        choices=("pool", "tu"),
        default="pool",
        help="pool (default, as Med-AD): train/unlabeled holds the pools and the bundle draws T_u at training "
        "(--anomaly_ratio, --unlabeled_size of configs/train.json); tu: it holds T_u itself",
    )
    t.add_argument("--unlabeled-size", type=_count_arg, help="|T_u| (default |T_n|, as the paper)")
    t.add_argument(
        "--anomaly-ratio",
        type=float,
        default=0.6,
        help="abnormal fraction of T_u (default 0.6, the paper's); checked against the pools, applied with "
        "--unlabeled tu",
    )


def _targets(source: str, args: argparse.Namespace) -> dict[tuple[str, int], int | None]:
    p = PAPER_SIZES[source]

    def pick(*values):
        return next(v for v in values if v is not None)

    val = {
        0: pick(args.val_normal, args.val_size, DEFAULT_VAL_SIZE),
        1: pick(args.val_abnormal, args.val_size, DEFAULT_VAL_SIZE),
    }
    from_test = args.val_from == "test"
    test = {
        0: pick(args.test_normal, args.test_size, p["test_normal"] - (val[0] if from_test else 0)),
        1: pick(args.test_abnormal, args.test_size, p["test_abnormal"] - (val[1] if from_test else 0)),
    }
    defaults = {
        0: p["pool_normal"] - (0 if from_test else val[0]),
        1: p["pool_abnormal"] - (0 if from_test else val[1]),
    }
    pools: dict[int, int | None] = {}
    for lab, given in ((0, args.unlabeled_normal), (1, args.unlabeled_abnormal)):
        if given == "all":
            pools[lab] = None
        elif given is not None:
            pools[lab] = given
        elif defaults[lab] < 0:
            raise ImporterError(
                f"--val-size {val[lab]} is larger than the paper's unlabeled pool; give the pool sizes."
            )
        else:
            pools[lab] = defaults[lab]
    return {
        ("test", 0): test[0],
        ("test", 1): test[1],
        ("val", 0): val[0],
        ("val", 1): val[1],
        ("train", 0): pick(args.train_normal, p["train_normal"]),
        ("unlabeled", 0): pools[0],
        ("unlabeled", 1): pools[1],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="import_medad.py",
        description="Turn a downloaded data set into the Med-AD layout (OUT/images + OUT/data.json) that the SAGAN "
        "bundle trains on (--dataset_dir OUT). " + _DICOM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{rsna,vindr,lag,generic}")

    rsna = sub.add_parser(
        "rsna",
        help="RSNA Pneumonia Detection Challenge (Kaggle): DICOMs + stage_2_detailed_class_info.csv",
        description="RSNA Pneumonia Detection Challenge. Labels from stage_2_detailed_class_info.csv (patientId,class, "
        "one row per box: deduplicated): Normal -> 0, Lung Opacity -> 1. The Med-AD repartition (8851 normal + 6012 "
        "lung opacity) leaves 'No Lung Opacity / Not Normal' out; --not-normal abnormal counts it abnormal. One image "
        "per patient (patientId). " + _DICOM_HELP,
    )
    rsna.add_argument("--images", required=True, help="the stage_2_train_images folder (<patientId>.dcm)")
    rsna.add_argument("--labels", required=True, help="stage_2_detailed_class_info.csv")
    rsna.add_argument(
        "--not-normal",
        choices=("exclude", "abnormal"),
        default="exclude",
        help="'No Lung Opacity / Not Normal' images: left out (default, Med-AD) or abnormal",
    )
    _common(rsna, ",".join(CHEST_MODALITIES))
    _sizes(rsna, "rsna")

    vindr = sub.add_parser(
        "vindr",
        help="VinDr-CXR (Kaggle VinBigData or PhysioNet): DICOMs + train.csv",
        description="VinDr-CXR. Labels from the Kaggle train.csv (image_id,class_name,...,rad_id: one row per reader "
        "finding) or PhysioNet's image_labels_train.csv: an image is normal only if every row of it says 'No "
        "finding'. VinDr-CXR gives no patient IDs: each image is split as its own patient. " + _DICOM_HELP,
    )
    vindr.add_argument("--images", required=True, help="the train folder (<image_id>.dicom)")
    vindr.add_argument("--labels", required=True, help="train.csv (Kaggle) or image_labels_train.csv (PhysioNet)")
    _common(vindr, ",".join(CHEST_MODALITIES))
    _sizes(vindr, "vindr")

    lag = sub.add_parser(
        "lag",
        help="LAG glaucoma database: class folders of fundus JPEGs",
        description="LAG (Li et al., CVPR 2019): fundus JPEGs in class folders, searched recursively; folders named "
        "by --exclude-dir (the ophthalmologists' attention maps) are skipped. No patient IDs: each image is split as "
        "its own patient. Images are written as 8-bit grey PNG (--size px on the short side) through the bundle's "
        "reader load_grayscale: colour becomes grey with the ITU-R 601-2 luma weights, as in the bundle.",
    )
    lag.add_argument("--root", required=True, help="the LAG folder holding the class folders")
    lag.add_argument(
        "--normal-dir", action="append", help="normal class folder under --root (repeatable; default non_glaucoma)"
    )
    lag.add_argument(
        "--abnormal-dir",
        action="append",
        help="abnormal class folder (repeatable; default suspicious_glaucoma and/or glaucoma, whichever exist)",
    )
    lag.add_argument("--exclude-dir", action="append", help="folder names skipped (repeatable; default attention_map)")
    _common(lag, "any")
    _sizes(lag, "lag")

    generic = sub.add_parser(
        "generic",
        help="your own images: known normals, unlabeled images, labelled val/test",
        description="Your own splits, taken as given. Folders are searched recursively for images; CSV paths are "
        "relative to the CSV's folder; an optional patient column (--patient-column) is checked: a patient in two "
        "splits is refused. " + _DICOM_HELP,
    )
    generic.add_argument("--normal", required=True, help="known normal images (T_n): a folder, or a CSV with 'path'")
    generic.add_argument(
        "--unlabeled",
        help="unlabeled images: a folder (labels unknown), a folder with 0/ and 1/ (labels known, "
        "for benchmarks), or a CSV with 'path' and optional 'label'. Unknown labels are listed under "
        "train/unlabeled/0: train with --anomaly_ratio 0",
    )
    generic.add_argument(
        "--labelled",
        help="labelled images: a folder with test/0, test/1 and optional val/0, val/1, or a CSV with "
        "'path','label' (0/1),'split' (val/test)",
    )
    generic.add_argument(
        "--patient-column", default="patient_id", help="CSV column of patient IDs (default patient_id)"
    )
    generic.add_argument(
        "--val-size",
        type=_count_arg,
        default=DEFAULT_VAL_SIZE,
        help=f"when --labelled has no val: move this many normal and abnormal test images (whole patients) to val "
        f"(default {DEFAULT_VAL_SIZE}; 0: no val)",
    )
    _common(generic, "any")
    return parser


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> ImportResult:
    """Command line: ``python scripts/import_medad.py {rsna,vindr,lag,generic} --help``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    common = {
        "out": args.out,
        "seed": args.seed,
        "size": args.size,
        "on_bad_file": args.on_bad_file,
        "modalities": args.modality,
        "workers": max(1, args.workers),
        "overwrite": args.overwrite,
        "log": log,
    }
    settings = {"command": ["import_medad.py"] + list(argv if argv is not None else sys.argv[1:])}
    if args.source == "generic":
        records, notes = read_generic(args.normal, args.unlabeled, args.labelled, args.patient_column)
        inputs = [p for p in (args.normal, args.unlabeled, args.labelled) if p]
        return import_fixed(records, val_size=args.val_size, inputs=inputs, notes=notes, settings=settings, **common)
    if args.source == "rsna":
        records, notes = read_rsna(args.images, args.labels, args.not_normal)
        inputs = [args.images, args.labels]
    elif args.source == "vindr":
        records, notes = read_vindr(args.images, args.labels)
        inputs = [args.images, args.labels]
    else:
        records, notes = read_lag(
            args.root,
            args.normal_dir or ("non_glaucoma",),
            args.abnormal_dir or ("suspicious_glaucoma", "glaucoma"),
            args.exclude_dir or ("attention_map",),
        )
        inputs = [args.root]
    val_from = "the unlabeled pools" if args.val_from == "unlabeled" else "the test allocation"
    notes.append(f"val is taken from {val_from} of the paper's repartition (--val-from).")
    return import_drawn(
        args.source,
        records,
        targets=_targets(args.source, args),
        scale_to_fit=args.scale_to_fit,
        unlabeled=args.unlabeled,
        unlabeled_size=args.unlabeled_size,
        anomaly_ratio=args.anomaly_ratio,
        inputs=inputs,
        notes=notes,
        settings=settings,
        **common,
    )
