# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The SAGAN app's ``/infer/sagan`` with ``alpha`` (the conformal decision), on a 3D NIfTI volume (scored slice by
slice, against the bundle's own ``inferring`` on the same volume), with ``dicom_seg`` (a DICOM SEG label of a DICOM
input), and the served model file read once per version.

One module-scoped client at a time: MONAI Label's app is a process-wide singleton, so this module serves its own
(calibrated) model, and the test that starts another server comes last."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from .helpers import app_client, bad_model, bundle_run, infer, read_model, read_scores, write_dicom
from .test_app_infer import _check_regions, _nifti

VOLUME_SHAPE = (48, 48, 24)  # the 3D NIfTI volume: 24 slices of 48 x 48 along the last axis
TISSUE = range(4, 20)  # its slices with foreground; 0-3 and 20-23 are empty caps
BLOB_SLICE = 11  # the slice with the largest blob (slices 10 and 12 hold a smaller one)
VOLUME_ALPHA = 0.1  # the alpha of the reference run of the volume
N_CALIBRATION = 199  # normal scores of the calibrated model: every p-value of a real image is 1 / 200


def _volume(rng: np.random.Generator) -> np.ndarray:
    """Smooth tissue (0.3-0.52) on slices 4-19, zeros on the caps, and on slices 10-12 a blob at the tissue's top
    intensity (0.52), largest on slice 11: after each slice's min-max scaling the blob slices are the brightest, and
    the calibrated model (which restores every image to black) scores an image by its mean brightness."""
    data = np.zeros(VOLUME_SHAPE, np.float32)
    x, y = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    for k in TISSUE:
        data[..., k] = 0.4 + 0.1 * np.sin(x / 6.0 + k) * np.cos(y / 7.0) + 0.02 * rng.random((48, 48))
    for k, radius in ((10, 5), (BLOB_SLICE, 9), (12, 5)):
        data[..., k][(x - 30) ** 2 + (y - 20) ** 2 <= radius**2] = 0.52
    return data


@pytest.fixture(scope="module")
def studies(tmp_path_factory, png_image) -> str:
    """ids: chest (the demo PNG), volume (the 3D NIfTI above), empty (a volume of zeros: no slice to score), ct (a
    DICOM CT slice with the patient and study attributes a SEG copies), bare (the same without them)."""
    root = tmp_path_factory.mktemp("studies_volumes")
    shutil.copy(png_image, root / "chest.png")
    affine = np.array([[0.9, 0, 0, -20.0], [0, 0.8, 0, 12.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(_volume(np.random.default_rng(0)), affine), root / "volume.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 6), np.float32), affine), root / "empty.nii.gz")
    pixels = (np.random.default_rng(1).random((48, 72)) * 3000).astype(np.uint16)
    pixels[10:18, 30:60] = 4095
    write_dicom(str(root / "bare.dcm"), pixels, 0.0, "1.2.3.4", "1.2.3", 1)
    ct = pydicom.dcmread(root / "bare.dcm")
    ct.PatientName, ct.PatientBirthDate, ct.PatientSex = "SAGAN^Test", "", ""
    ct.StudyDate, ct.StudyTime, ct.StudyID, ct.AccessionNumber, ct.ReferringPhysicianName = "", "", "", "", ""
    ct.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ct.save_as(root / "ct.dcm")
    return str(root)


@pytest.fixture(scope="module")
def calibrated_model(tiny_model, tmp_path_factory) -> str:
    """A model whose scores and p-values are known: the tiny model made to restore every image to black
    (``helpers.bad_model``: the score is then the image's mean brightness in [0, 1]) with 199 stored normal scores in
    [0, 1e-6], below any real image's score, so that every p-value is 1 / 200 (and a 16-slice volume's Bonferroni
    p-value 16 / 200)."""
    folder = tmp_path_factory.mktemp("calibrated")
    state, settings = read_model(bad_model(tiny_model, str(folder / "black.pt"), -1.0))
    settings = {**settings, "normal_scores": [float(s) for s in np.linspace(0.0, 1e-6, N_CALIBRATION)]}
    torch.save({"model": dict(state), "settings": settings}, folder / "model.pt")
    return str(folder / "model.pt")


@pytest.fixture(scope="module")
def client(studies, calibrated_model, bundle_copy, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("served_calibrated")
    shutil.copy(calibrated_model, model_dir / "model.pt")
    with app_client(studies, {"bundle": bundle_copy, "model_dir": str(model_dir), "skip_trainers": "true"}) as c:
        yield c


@pytest.fixture(scope="module")
def settings(calibrated_model):
    return read_model(calibrated_model)[1]


@pytest.fixture(scope="module")
def volume_reference(studies, calibrated_model, tmp_path_factory) -> str:
    """The output folder of the bundle's own ``inferring --alpha VOLUME_ALPHA`` on the volume alone (scores.csv with
    a row per scored slice, volumes.csv, the volume's label map)."""
    inputs = tmp_path_factory.mktemp("volume_in")
    shutil.copy(os.path.join(studies, "volume.nii.gz"), inputs / "volume.nii.gz")
    out = tmp_path_factory.mktemp("volume_out")
    bundle_run(
        "inferring",
        "--config_file",
        "configs/inference.json",
        "--input_path",
        str(inputs),
        "--output_dir",
        str(out),
        "--model_path",
        calibrated_model,
        "--alpha",
        str(VOLUME_ALPHA),
    )
    return str(out)


def test_alpha_decides_by_the_p_value(client, settings):
    """The same image: without alpha the threshold decides; with alpha, p_value <= alpha, so that abnormal flips
    between an alpha below its p-value (1 / 200) and one above."""
    status, plain, _, _ = infer(client, "chest")
    assert status == 200, plain
    p = plain["p_value"]
    assert p == pytest.approx(1 / (N_CALIBRATION + 1))
    assert plain["alpha"] is None and plain["abnormal"] == (plain["anomaly_score"] > settings["threshold"])
    for alpha, expected in ((0.004, False), (0.01, True), ("0.01", True)):
        status, result, label, _ = infer(client, "chest", {"alpha": alpha})
        assert status == 200, result
        assert result["alpha"] == float(alpha)
        assert result["p_value"] == pytest.approx(p) and result["anomaly_score"] == plain["anomaly_score"]
        assert result["abnormal"] is expected == (p <= float(alpha))
        assert result["threshold"] == plain["threshold"] and label is not None


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.1, "nan", "abc", True, [0.1]])
def test_invalid_alpha_is_refused_clearly(client, alpha):
    status, result, _, _ = infer(client, "chest", {"alpha": alpha})
    assert status == 422, result
    assert "alpha must be" in result["detail"] and "(0, 1)" in result["detail"], result["detail"]


def _check_volume_label(label: bytes, studies: str, tmp_path) -> np.ndarray:
    source = nib.load(os.path.join(studies, "volume.nii.gz"))
    out = _nifti(label, tmp_path)
    data = np.asarray(out.dataobj)
    assert data.shape == source.shape == VOLUME_SHAPE
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-4)
    assert set(np.unique(data)) <= {0, 1}
    return data


def test_infer_volume_slice_by_slice(client, studies, volume_reference, tmp_path):
    """A 3D NIfTI volume without slice_index: every slice with foreground scored as run inferring scores it, a label
    volume in the input's geometry, the volume's score, top slice and Bonferroni decision as in volumes.csv."""
    status, result, label, name = infer(client, "volume", {"alpha": VOLUME_ALPHA})
    assert status == 200, result
    assert name.endswith(".nii.gz")
    volume = result["volume"]
    slices = volume["slice_results"]
    scores = {r["slice"]: r["anomaly_score"] for r in slices}
    assert list(scores) == list(TISSUE)  # the empty caps are not scored
    assert (volume["slice_axis"], volume["slices"], volume["slices_scored"]) == (2, VOLUME_SHAPE[2], len(TISSUE))
    assert volume["top_slice"] == max(scores, key=scores.get) == BLOB_SLICE
    assert result["anomaly_score"] == volume["volume_score"] == volume["top_slice_score"] == scores[BLOB_SLICE]
    assert result["slice_index"] is None
    # Bonferroni: every slice's p-value is 1 / 200 (<= alpha: each slice abnormal), the volume's 16 / 200 = 0.08
    assert all(r["p_value"] == pytest.approx(1 / (N_CALIBRATION + 1)) for r in slices)
    assert all(r["abnormal"] is True for r in slices) and volume["abnormal_slices"] == len(TISSUE)
    bonferroni = min(1.0, len(slices) * min(r["p_value"] for r in slices))
    assert result["p_value"] == volume["volume_p_value"] == pytest.approx(bonferroni) == pytest.approx(0.08)
    assert volume["p_value_of_top_slice"] == pytest.approx(1 / (N_CALIBRATION + 1))
    assert result["alpha"] == VOLUME_ALPHA and result["abnormal"] is volume["abnormal"] is True

    # the bundle's own inferring on the same volume: per-slice scores, the volumes.csv row, the label map
    reference = read_scores(os.path.join(volume_reference, "scores.csv"))
    assert sorted(reference) == sorted(f"volume.nii.gz#slice={k}" for k in TISSUE)
    for k, score in scores.items():
        assert abs(score - reference[f"volume.nii.gz#slice={k}"]) <= 1e-5, k
    with open(os.path.join(volume_reference, "volumes.csv")) as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["top_slice"]) == volume["top_slice"] and int(row["slices_scored"]) == volume["slices_scored"]
    assert float(row["volume_score"]) == pytest.approx(volume["volume_score"], abs=1e-5)
    assert float(row["volume_p_value"]) == pytest.approx(volume["volume_p_value"])
    assert bool(int(row["abnormal"])) is result["abnormal"]
    assert int(row["abnormal_slices"]) == volume["abnormal_slices"]
    data = _check_volume_label(label, studies, tmp_path)
    reference_label = np.asarray(nib.load(os.path.join(volume_reference, "volume_label.nii.gz")).dataobj)
    np.testing.assert_array_equal(data, reference_label)
    assert not data[..., : TISSUE[0]].any() and not data[..., TISSUE[-1] + 1 :].any()
    labelled = set(np.flatnonzero(data.sum(axis=(0, 1))).tolist())
    assert labelled == {r["slice"] for r in result["regions"]} and labelled <= set(TISSUE)
    for k in labelled:
        _check_regions(
            {
                "regions": [r for r in result["regions"] if r["slice"] == k],
                "pixel_threshold": result["pixel_threshold"],
            },
            data[..., k],
        )

    # the same volume at alpha 0.05: every slice abnormal (p = 0.005), the volume not (0.08 > 0.05); without alpha
    # the threshold decides on the top slice's score
    status, strict, _, _ = infer(client, "volume", {"alpha": 0.05})
    assert status == 200, strict
    assert strict["volume"]["abnormal_slices"] == len(TISSUE) and strict["abnormal"] is False
    assert strict["p_value"] == pytest.approx(0.08) and strict["anomaly_score"] == result["anomaly_score"]
    status, plain, _, _ = infer(client, "volume")
    assert status == 200, plain
    assert plain["alpha"] is None and plain["abnormal"] == (plain["anomaly_score"] > plain["threshold"])


def test_volume_slice_index_still_scores_one_slice(client, studies, tmp_path):
    """With slice_index a volume is scored on that slice alone, as before."""
    status, result, label, _ = infer(client, "volume", {"slice_index": BLOB_SLICE})
    assert status == 200, result
    assert result["slice_index"] == BLOB_SLICE and result["volume"] is None
    data = _check_volume_label(label, studies, tmp_path)
    assert set(np.flatnonzero(data.sum(axis=(0, 1))).tolist()) <= {BLOB_SLICE}


def test_uploaded_volume_is_scored_slice_by_slice(client, studies):
    """A volume sent as a file (as 3D Slicer sends an image that is not in the server's datastore)."""
    with open(os.path.join(studies, "volume.nii.gz"), "rb") as f:
        content = f.read()
    response = client.post(
        "/infer/sagan?output=json",
        files={"file": ("head.nii.gz", content)},
        data={"params": json.dumps({"alpha": VOLUME_ALPHA})},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["volume"]["top_slice"] == BLOB_SLICE and result["volume"]["slices_scored"] == len(TISSUE)
    assert result["abnormal"] is True and result["p_value"] == pytest.approx(0.08)


def test_volume_without_foreground_is_refused_clearly(client):
    status, result, _, _ = infer(client, "empty")
    assert status == 422, result
    assert "empty.nii.gz" in result["detail"] and "foreground" in result["detail"], result["detail"]


def test_dicom_seg_of_a_dicom_input(client, studies, tmp_path):
    """dicom_seg: the label comes back as a DICOM SEG on the source's rows x columns, referencing it, with the
    regions of the NIfTI label of the same request without dicom_seg; the scores are the same."""
    status, plain, nifti, _ = infer(client, "ct")
    assert status == 200, plain
    status, result, label, name = infer(client, "ct", {"dicom_seg": True, "alpha": VOLUME_ALPHA})
    assert status == 200, result
    assert name.endswith(".dcm")
    seg = pydicom.dcmread(io.BytesIO(label))
    source = pydicom.dcmread(os.path.join(studies, "ct.dcm"))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (source.Rows, source.Columns, 1)
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert referenced == source.SOPInstanceUID
    assert result["dicom_seg"] == {"series_instance_uid": seg.SeriesInstanceUID, "sop_instance_uid": seg.SOPInstanceUID}
    regions = np.asarray(_nifti(nifti, tmp_path).dataobj)[..., 0].T  # (columns, rows) -> (rows, columns)
    assert regions.any()
    np.testing.assert_array_equal(seg.pixel_array, regions)
    assert result["anomaly_score"] == plain["anomaly_score"] and result["regions"] == plain["regions"]
    assert result["alpha"] == VOLUME_ALPHA and result["abnormal"] is True  # p = 1 / 200


@pytest.mark.parametrize(
    "image, params, words",
    [
        ("chest", {"dicom_seg": True}, ["chest.png", "not a DICOM image", "dicom_seg"]),
        ("volume", {"dicom_seg": "true"}, ["volume.nii.gz", "not a DICOM image"]),
        ("bare", {"dicom_seg": True}, ["bare.dcm", "cannot be the source of a DICOM SEG", "PatientName"]),
        ("ct", {"dicom_seg": "maybe"}, ["dicom_seg must be true or false"]),
    ],
)
def test_dicom_seg_refusals_name_the_problem(client, image, params, words):
    status, result, _, _ = infer(client, image, params)
    assert status == 422, result
    for word in words:
        assert word in result["detail"], result["detail"]


def test_model_file_is_read_once(studies, tiny_model, bundle_copy, tmp_path, monkeypatch):
    """Start-up and requests read the served model file once (settings and weights from one torch.load); a new
    version of the file is read once more. (Starts its own server: keep it the module's last test.)"""
    from lib.infers.sagan import read_served_model

    from bundle.settings import load_model_settings

    assert read_served_model(tiny_model)[0] == load_model_settings(tiny_model)
    model_dir = tmp_path / "served"
    model_dir.mkdir()
    model = str(model_dir / "model.pt")
    shutil.copy(tiny_model, model)
    reads = []
    load = torch.load

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.realpath(f) == os.path.realpath(model):
            reads.append(f)
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    conf = {"bundle": bundle_copy, "model_dir": str(model_dir), "skip_trainers": "true"}
    with app_client(studies, conf) as c:
        for _ in range(2):
            assert infer(c, "chest")[0] == 200
        assert len(reads) == 1, reads
        stat = os.stat(model)
        shutil.copy(tiny_model, model)
        os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version
        for _ in range(2):
            assert infer(c, "chest")[0] == 200
        assert len(reads) == 2, reads
