# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Helpers and fixtures for the MONAI Label app's tests. They run in ``.venv-monailabel``
(``bash scripts/setup_monailabel.sh``; ``tests/test_monailabel.py`` drives them from the bundle's ``.venv``); training
and the reference scores run in the bundle's ``.venv`` through subprocesses, as the app itself does."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP_DIR = os.path.join(ROOT, "scripts", "monailabel_app")
BUNDLE_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
TINY_SIZES = {"train": (12, 0), "unlabeled": (8, 12), "val": (6, 6), "test": (0, 0)}
TINY_TRAIN = "--conv_dim 4 --num_res_blocks 1 --d_conv_dim 4 --batch_size 4 --iterations 4 --val_interval 2"

for path in (ROOT, APP_DIR):
    if path not in sys.path:
        sys.path.insert(0, path)

# The 2 CPU cores are shared: one thread per process (here, and in the bundle and MONAI Label subprocesses) keeps the
# tiny networks from waiting on each other's threads. Scores do not depend on it beyond float rounding (<< 1e-5).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def bundle_run(*args: str) -> str:
    """``python -m monai.bundle run ...`` in the bundle's .venv from the bundle root; returns the log."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [BUNDLE_PYTHON, "-m", "monai.bundle", "run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def snapshot(folder: str) -> dict[str, int]:
    """Every file under ``folder`` (``__pycache__`` aside) with its modification time."""
    found = {}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            path = os.path.join(dirpath, f)
            found[path] = os.lstat(path).st_mtime_ns
    return found


def write_dicom(path: str, pixels: np.ndarray, z: float, series_uid: str, study_uid: str, number: int) -> None:
    """One 16-bit MONOCHROME2 CT slice; ``pixels`` is (rows, columns)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study_uid, series_uid, "CT", "sagan"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-10.0, 5.0, float(z)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.7], 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(path, write_like_original=False)


def write_series(folder: str, slices: list[np.ndarray]) -> None:
    """A DICOM series, one file per slice, slice k at z = 2k (so ITK's position order is the list order)."""
    from pydicom.uid import generate_uid

    os.makedirs(folder, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    for k, pixels in enumerate(slices):
        write_dicom(os.path.join(folder, f"slice{k}.dcm"), pixels, 2.0 * k, series, study, k + 1)


def read_model(path: str) -> tuple[dict, dict | None]:
    """``(state dict, settings)`` of a model file in either format: the bundle's plain state dict with
    ``_metadata["sagan_settings"]`` (``bundle.settings.read_model``) or ``{"model": ..., "settings": ...}``."""
    try:
        from bundle.settings import read_model as bundle_read_model
    except ImportError:  # a bundle before the plain state-dict format
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return checkpoint["model"], checkpoint.get("settings")
    state, settings = bundle_read_model(path)
    return dict(state), settings


def bad_model(source: str, target: str, restore_to: float) -> str:
    """A copy of the model ``source`` whose generator restores every image to about the constant ``restore_to``
    (+1: white, -1: black). The head's residual block is made to output 1 everywhere (instance-norm affine weight 0,
    bias 1, then 0 for its refinement) and the last 7x7 convolution sums it to 20 * ``restore_to`` (at least a third
    of that at patch corners), so that x' = tanh(m + x) saturates."""
    from bundle.settings import generator_from_settings, load_model_settings

    state, settings = read_model(source)
    net = generator_from_settings(load_model_settings(source))
    net.load_state_dict(state)
    block, last = net.head[0], net.head[1].conv
    with torch.no_grad():
        block.project.adn.N.weight.zero_()
        block.project.adn.N.bias.fill_(1.0)
        block.refine.adn.N.weight.zero_()
        block.refine.adn.N.bias.zero_()
        last.weight.fill_(20.0 * restore_to / last.weight[0].numel())
        restored = net.eval()(torch.rand(1, 1, 64, 64) * 2 - 1)
    assert torch.allclose(restored, torch.full_like(restored, restore_to), atol=0.01), "not a constant restoration"
    torch.save({"model": net.state_dict(), "settings": settings}, target)
    return target


@contextlib.contextmanager
def app_client(studies: str, conf: dict[str, str]):
    """FastAPI's TestClient on ``monailabel.app.app`` with the SAGAN app on ``studies`` (as MONAI Label's own
    tests/unit/endpoints/context.py). The settings also go to the environment, for the background training
    subprocess that MONAI Label starts (``python -m monailabel.interfaces.utils.app -m train``).

    ``conf`` must name the bundle (``bundle``: e.g. the ``bundle_copy`` fixture) and the app's ``model_dir``: the
    app's defaults are the repository itself, whose ``models/model.pt`` (what the README's demo training writes) it
    would serve, so a test would depend on what the user did in the checkout before."""
    missing = [k for k in ("bundle", "model_dir") if not conf.get(k)]
    assert not missing, f"app_client: conf must set {missing} (tests must not read the checkout's models/)"
    from fastapi.testclient import TestClient
    from monailabel.app import app
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    settings.MONAI_LABEL_APP_DIR = APP_DIR
    settings.MONAI_LABEL_STUDIES = studies
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_APP_CONF = conf
    environ = dict(os.environ)
    os.environ.update(
        {
            "MONAI_LABEL_APP_DIR": APP_DIR,
            "MONAI_LABEL_STUDIES": studies,
            "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
            "MONAI_LABEL_APP_CONF": json.dumps(conf),
            "PYTHONPATH": os.pathsep.join([APP_DIR, ROOT]),
        }
    )
    clear_cache()
    try:
        with TestClient(app) as client:
            yield client
    finally:
        clear_cache()
        os.environ.clear()
        os.environ.update(environ)


def infer(client, image: str, params: dict | None = None):
    """``POST /infer/sagan?image=ID&output=all`` -> (status, JSON result, label file bytes, label file name)."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    response = client.post(f"/infer/sagan?image={image}&output=all", data={"params": json.dumps(params or {})})
    if response.status_code != 200:
        return response.status_code, response.json(), None, None
    result, label, name = None, None, None
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        else:
            label, name = part.content, disposition.split('filename="')[1].rstrip('"')
    return response.status_code, result, label, name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny SAGAN generator trained once by the bundle's own training (bundle .venv) on a tiny demo set."""
    if not os.path.isfile(BUNDLE_PYTHON):
        pytest.skip(f"{BUNDLE_PYTHON} is missing: run bash scripts/setup.sh")
    work = tmp_path_factory.mktemp("tiny_model")
    subprocess.run(
        [
            BUNDLE_PYTHON,
            "-c",
            "import sys; from bundle.demo import make_demo_dataset; "
            f"make_demo_dataset(sys.argv[1], seed=1, sizes={TINY_SIZES!r})",
            str(work / "data"),
        ],
        cwd=ROOT,
        check=True,
    )
    bundle_run(
        "training",
        "--config_file",
        "configs/train.json",
        "--dataset_dir",
        str(work / "data"),
        "--ckpt_dir",
        str(work / "models"),
        "--output_dir",
        str(work / "runs"),
        "--progress_bar",
        "False",
        *TINY_TRAIN.split(),
    )
    return str(work / "models" / "model.pt")


@pytest.fixture(scope="session")
def bundle_copy(tmp_path_factory) -> str:
    """A copy of the bundle (configs, code, metadata; no ``models/``, ``data/``, ``runs/``, ...) for the app to use, so
    that the tests do not depend on what a user's work left in the checkout (e.g. ``models/model.pt`` of the demo
    training), and can check that nothing is written into the bundle folder."""
    root = tmp_path_factory.mktemp("bundle")
    for name in ("configs", "bundle"):
        shutil.copytree(
            os.path.join(ROOT, name), root / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(os.path.join(ROOT, "metadata.json"), root / "metadata.json")
    return str(root)


@pytest.fixture(scope="session")
def demo_images(tiny_model) -> str:
    """The images folder of the tiny demo set the tiny model was trained on."""
    return os.path.join(os.path.dirname(os.path.dirname(tiny_model)), "data", "images")


@pytest.fixture(scope="session")
def png_image(demo_images, tmp_path_factory) -> str:
    """An abnormal demo image, resized to a non-square 112x80 (W x H) so that mapping back is exercised."""
    path = tmp_path_factory.mktemp("png") / "chest.png"
    Image.open(os.path.join(demo_images, "val_1_0000.png")).resize((112, 80), Image.BILINEAR).save(path)
    return str(path)


def read_scores(csv_path: str) -> dict[str, float]:
    with open(csv_path) as f:
        return {os.path.basename(row[0]): float(row[1]) for row in csv.reader(f) if row}
