# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The real MONAI Label server (FastAPI app, in-process) with the SAGAN app: ``/info/`` and ``/infer/sagan`` on a
PNG, a JPEG, a NIfTI, a DICOM file and a DICOM series, against the bundle's own ``inferring`` scores."""

from __future__ import annotations

import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
import pytest
from monai.data import ITKReader, PydicomReader
from monai.transforms import LoadImage
from PIL import Image

from bundle.conformal import conformal_p_value

from .helpers import (
    APP_DIR,
    ROOT,
    app_client,
    bundle_run,
    infer,
    read_model,
    read_scores,
    snapshot,
    write_dicom,
    write_series,
)

SLICE = 1  # the slice of the 3-slice series that is scored


@pytest.fixture(scope="module")
def studies(tmp_path_factory, png_image) -> str:
    """A studies folder with one image of each input kind (ids: chest, photo, scan, single, series, broken)."""
    root = tmp_path_factory.mktemp("studies")
    rng = np.random.default_rng(0)
    shutil.copy(png_image, root / "chest.png")
    Image.open(png_image).convert("RGB").save(root / "photo.jpg", quality=90)
    affine = np.array([[0.8, 0, 0, 10.0], [0, 0.6, 0, -20.0], [0, 0, 2.0, 5.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((72, 88, 1)).astype(np.float32), affine), root / "scan.nii.gz")
    slices = [(rng.random((48, 72)) * 3000).astype(np.uint16) for _ in range(3)]
    for pixels in slices:
        pixels[10:18, 30:60] = 4095  # a bright bar: an anomaly region for the tiny model
    write_series(str(root / "series"), slices)
    write_dicom(str(root / "single.dcm"), slices[0], 0.0, "1.2.3.4", "1.2.3", 1)
    (root / "broken.png").write_bytes(b"not a png")
    return str(root)


@pytest.fixture(scope="module")
def reference_scores(studies, tiny_model, tmp_path_factory) -> dict[str, float]:
    """Scores of the bundle's own ``python -m monai.bundle run inferring`` (bundle .venv) for the same files; the
    series is represented by the file of its scored slice."""
    inputs = tmp_path_factory.mktemp("reference_in")
    for name in ("chest.png", "photo.jpg", "scan.nii.gz", "single.dcm"):
        shutil.copy(os.path.join(studies, name), inputs / name)
    shutil.copy(os.path.join(studies, "series", f"slice{SLICE}.dcm"), inputs / "series_slice.dcm")
    out = tmp_path_factory.mktemp("reference_out")
    # batch size 1: the bundle cannot collate 2D and 3D inputs' metadata in one batch
    bundle_run(
        "inferring",
        "--config_file",
        "configs/inference.json",
        "--input_path",
        str(inputs),
        "--output_dir",
        str(out),
        "--model_path",
        tiny_model,
        "--dataloader#batch_size",
        "1",
    )
    return read_scores(str(out / "scores.csv"))


@pytest.fixture(scope="module")
def client(studies, tiny_model, bundle_copy, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served")
    shutil.copy(tiny_model, model_dir / "model.pt")
    before = snapshot(bundle_copy)
    with app_client(studies, {"bundle": bundle_copy, "model_dir": str(model_dir), "skip_trainers": "true"}) as c:
        yield c
    assert snapshot(bundle_copy) == before, "the app wrote into the bundle folder"


def test_info_lists_the_sagan_model(client):
    info = client.get("/info/").json()
    model = info["models"]["sagan"]
    assert model["type"] == "segmentation"
    assert model["labels"] == {"anomaly": 1}
    assert model["dimension"] == 2
    assert "model_filename" not in model["config"]
    assert info["trainers"] == {}  # skip_trainers
    assert info["datastore"]["total"] == 6  # 5 images + the broken one; the series folder counts once


def _check_regions(result, label2d):
    """Boxes hold exactly their region's pixels, inside the image, and together all labelled pixels."""
    assert sum(r["area"] for r in result["regions"]) == int(label2d.sum())
    for r in result["regions"]:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 <= x1 < label2d.shape[0] and 0 <= y0 <= y1 < label2d.shape[1]
        assert label2d[x0 : x1 + 1, y0 : y1 + 1].sum() >= r["area"]
        assert label2d[x0, y0 : y1 + 1].any() and label2d[x1, y0 : y1 + 1].any()  # tight box
        assert result["pixel_threshold"] < r["peak_heat"] <= 2.0  # smoothed |x - x'|, x and x' in [-1, 1]
    peaks = [r["peak_heat"] for r in result["regions"]]
    assert peaks == sorted(peaks, reverse=True)


def _check_result(result, reference, settings):
    assert abs(result["anomaly_score"] - reference) <= 1e-5
    assert result["threshold"] == pytest.approx(settings["threshold"])
    assert result["pixel_threshold"] == pytest.approx(settings["pixel_threshold"])
    assert result["abnormal"] == (result["anomaly_score"] > settings["threshold"])
    n = len(settings["normal_scores"])  # the conformal p-value among the normal scores that set the threshold
    assert 1 / (n + 1) - 1e-7 <= result["p_value"] <= 1 + 1e-7
    assert result["p_value"] == pytest.approx(
        float(conformal_p_value(result["anomaly_score"], settings["normal_scores"]))
    )
    assert result["label_names"] == {"anomaly": 1}
    # what the model file records, no nulls (the tiny model's settings may lack "iteration": then it is left out)
    keys = ("bundle_version", "iteration", "selected_by", "image_size")
    assert result["model"] == {k: settings[k] for k in keys if settings.get(k) is not None}
    assert result["model"]["image_size"] == 64


@pytest.fixture(scope="module")
def settings(tiny_model):
    return read_model(tiny_model)[1]


@pytest.mark.parametrize("image, source", [("chest", "chest.png"), ("photo", "photo.jpg")])
def test_infer_photo(client, studies, reference_scores, settings, image, source):
    status, result, label, name = infer(client, image)
    assert status == 200, result
    _check_result(result, reference_scores[source], settings)
    assert name.endswith(".png")  # also for JPEG: a lossy label would corrupt 0/1
    pil = Image.open(io.BytesIO(label))
    array = np.asarray(pil)
    assert pil.mode == "L" and array.dtype == np.uint8
    assert array.shape == np.asarray(Image.open(os.path.join(studies, source))).shape[:2] == (80, 112)
    assert set(np.unique(array)) <= {0, 1}
    _check_regions(result, array.T)  # boxes are (x = column, y = row)


def _nifti(label: bytes, tmp_path) -> nib.Nifti1Image:
    path = tmp_path / "label.nii.gz"
    path.write_bytes(label)
    image = nib.load(path)
    assert np.asarray(image.dataobj).dtype == np.uint8
    return image


def test_infer_nifti(client, studies, reference_scores, settings, tmp_path):
    status, result, label, name = infer(client, "scan")
    assert status == 200, result
    _check_result(result, reference_scores["scan.nii.gz"], settings)
    assert name.endswith(".nii.gz")
    source = nib.load(os.path.join(studies, "scan.nii.gz"))
    out = _nifti(label, tmp_path)
    data = np.asarray(out.dataobj)
    assert data.shape == source.shape == (72, 88, 1)
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
    assert set(np.unique(data)) <= {0, 1}
    assert all(r["slice"] == 0 for r in result["regions"])
    _check_regions(result, data[..., 0])


def test_infer_dicom_file(client, studies, reference_scores, settings, tmp_path):
    status, result, label, name = infer(client, "single")
    assert status == 200, result
    _check_result(result, reference_scores["single.dcm"], settings)
    assert name.endswith(".nii.gz")  # a labelmap viewers open; a DICOM label would be a plain secondary capture
    source = LoadImage(reader=PydicomReader(), image_only=True)(os.path.join(studies, "single.dcm"))
    out = _nifti(label, tmp_path)
    assert np.asarray(out.dataobj).shape == (*source.shape, 1) == (72, 48, 1)  # (columns, rows, 1)
    np.testing.assert_allclose(out.affine[:3, :2], np.asarray(source.affine)[:3, :2], atol=1e-4)
    np.testing.assert_allclose(out.affine[:3, 3], np.asarray(source.affine)[:3, 3], atol=1e-4)


def test_infer_dicom_series(client, studies, reference_scores, settings, tmp_path):
    status, result, label, name = infer(client, "series", {"slice_index": SLICE})
    assert status == 200, result
    _check_result(result, reference_scores["series_slice.dcm"], settings)
    assert result["slice_index"] == SLICE
    assert name.endswith(".nii.gz")
    source = LoadImage(reader=ITKReader(), image_only=True)(os.path.join(studies, "series"))
    out = _nifti(label, tmp_path)
    data = np.asarray(out.dataobj)
    assert data.shape == tuple(source.shape) == (72, 48, 3)
    np.testing.assert_allclose(out.affine, np.asarray(source.affine), atol=1e-4)
    assert result["regions"], "random-noise slices should give regions with the tiny model"
    assert np.flatnonzero(data.sum(axis=(0, 1))).tolist() == [SLICE]  # only the scored slice is labelled
    assert all(r["slice"] == SLICE for r in result["regions"])
    _check_regions(result, data[..., SLICE])


@pytest.mark.parametrize(
    "image, params, words",
    [
        ("series", {}, ["series", "3 slices", "slice_index"]),
        ("series", {"slice_index": 3}, ["series", "slice_index 3 outside"]),
        ("broken", {}, ["broken.png", "cannot read"]),
    ],
)
def test_bad_input_is_refused_clearly(client, image, params, words):
    status, result, _, _ = infer(client, image, params)
    assert status == 422
    for word in words:
        assert word in result["detail"]


def test_latency(client):
    """Median of 5 requests on the PNG (CPU), printed for the record; a loose bound guards against regressions."""
    times = []
    for _ in range(5):
        start = time.perf_counter()
        assert infer(client, "chest")[0] == 200
        times.append(time.perf_counter() - start)
    print(f"/infer/sagan latency on {os.cpu_count()} CPU cores: median {statistics.median(times):.3f} s")
    assert statistics.median(times) < 10.0


def test_unknown_image_id_is_404_naming_it(client):
    status, result, _, _ = infer(client, "no_such_image")
    assert status == 404
    assert "'no_such_image'" in result["detail"] and "not in the datastore" in result["detail"]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("my scan.png", b"not a png", ["my scan.png: cannot read it as a PNG/JPEG/BMP image", "cannot identify"]),
        ("notes.txt", b"hello", ["notes.txt: not an image the app reads (PNG, JPEG, BMP, DICOM"]),
        ("head.nii.gz", b"junk", ["head.nii.gz: cannot read it as a NIfTI image"]),
    ],
)
def test_unreadable_upload_is_one_line_naming_it(client, name, content, words):
    """An uploaded file is stored by MONAI Label under a temporary name, and MONAI's loader lists every reader's
    error: the message names the upload and gives the one reason that fits its suffix."""
    response = client.post("/infer/sagan?output=json", files={"file": (name, content)}, data={"params": "{}"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail
    assert "\n" not in detail and "NRRD" not in detail and "pickle" not in detail
    assert "/tmp" not in detail and tempfile.gettempdir() not in detail


def test_writer_is_warm_after_start_up(studies, tiny_model, bundle_copy, tmp_path, caplog):
    """The server's start-up warms MONAI Label's result writer (ITK's lazy modules), unless conf warm_up false."""
    model_dir = tmp_path / "served"
    model_dir.mkdir()
    shutil.copy(tiny_model, model_dir / "model.pt")
    conf = {"bundle": bundle_copy, "model_dir": str(model_dir), "skip_trainers": "true"}
    for warm_up, expected in (("true", 1), ("false", 0)):
        caplog.clear()
        with caplog.at_level(logging.INFO), app_client(studies, {**conf, "warm_up": warm_up}):
            warmed = [r for r in caplog.records if "result writer (ITK) warmed up" in r.getMessage()]
        assert len(warmed) == expected, warm_up


def test_warm_up_makes_the_first_write_fast(tmp_path):
    """In a fresh process: after :func:`lib.server.warm_up_writer` the first PNG label written by MONAI Label's
    writer takes as long as later ones (ITK's lazy loading, 2-5 s on this CPU, happened in the warm-up)."""
    script = (
        "import sys, time, numpy as np\n"
        "from monailabel.transform.writer import write_itk\n"
        "from lib.server import warm_up_writer\n"
        "if sys.argv[1] == 'warm': warm_up_writer()\n"
        "start = time.perf_counter()\n"
        "write_itk(np.zeros((80, 112), np.uint8), sys.argv[2], None, np.uint8, False)\n"
        "print(time.perf_counter() - start)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([APP_DIR, ROOT])}
    seconds = {}
    for mode in ("cold", "warm"):
        out = subprocess.run(
            [sys.executable, "-c", script, mode, str(tmp_path / f"{mode}.png")],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        seconds[mode] = float(out.stdout.strip().splitlines()[-1])
    print(f"first label write: {seconds}")
    assert seconds["warm"] < 0.25 < seconds["cold"], seconds
