"""DICOM SEG and SR of inference (``--output_format dicom``): read back with pydicom and highdicom, they reference the
source image, lie on its pixel grid, hold the expected regions and the values of scores.csv."""

import csv
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from pydicom.uid import CTImageStorage, SegmentationStorage

from bundle.pretrained import pretrained_model_path, sha256_of
from bundle.settings import read_model
from bundle.transforms import SaveDicomSegSRd
from bundle.transforms.dicom_output import source_grid_mask
from bundle.transforms.regions import region_mask

from .conftest import ROOT
from .dicom_files import make_dicom, make_dicom_study

hd = pytest.importorskip("highdicom")

ROWS, COLUMNS = 40, 56  # the source image; the model grid is 64 x 64
BLOCK = (slice(32, 48), slice(8, 24))  # a hot block of the model-grid heat map: (columns, rows) in MONAI's order


def block_heatmap(filename):
    """(1, 64, 64) heat map, 1.5 inside :data:`BLOCK`, 0 elsewhere, carrying ``filename`` as its source."""
    heat = torch.zeros(1, 64, 64)
    heat[0, BLOCK[0], BLOCK[1]] = 1.5
    return MetaTensor(heat, meta={"filename_or_obj": str(filename)})


def expected_block_mask():
    """The source-grid mask of :func:`block_heatmap` at pixel threshold 0.5, computed without the bundle: smoothing
    with sigma 1 keeps the block's edge pixels above 0.5 and its neighbours below, so the model-grid region is the
    block; a source pixel (row r, column c) is in it when the model pixel under its centre is (nearest neighbour)."""
    model_column = np.floor((np.arange(COLUMNS) + 0.5) * 64 / COLUMNS).astype(int)
    model_row = np.floor((np.arange(ROWS) + 0.5) * 64 / ROWS).astype(int)
    in_columns = (model_column >= BLOCK[0].start) & (model_column < BLOCK[0].stop)
    in_rows = (model_row >= BLOCK[1].start) & (model_row < BLOCK[1].stop)
    return (in_rows[:, None] & in_columns[None, :]).astype(np.uint8)


def item(heatmap, **values):
    """A decollated inference item as the postprocessing hands it to the transform."""
    return {"heatmap": heatmap, **{k: torch.tensor([float(v)]) for k, v in values.items()}}


def measurements(sr):
    """``{concept meaning: value}`` of the SR's (only) measurement group, its finding, qualitative evaluations, source
    image references and algorithm text items."""
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    evaluations = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
    sources = [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in group.source_images]
    texts = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in group if i.ValueType == "TEXT"}
    for i in group:  # TID 4019 sits under the algorithm name item
        for child in getattr(i, "ContentSequence", []):
            if child.ValueType == "TEXT":
                texts.setdefault(child.ConceptNameCodeSequence[0].CodeMeaning, []).append(child.TextValue)
    return values, group.finding_type, evaluations, sources, texts


def assert_references_source(instance, source):
    """Patient, study and the referenced series and SOP instance of a SEG or SR are the source's."""
    assert instance.StudyInstanceUID == source.StudyInstanceUID and instance.PatientID == source.PatientID
    assert instance.SeriesInstanceUID != source.SeriesInstanceUID  # a new series of its own
    if instance.SOPClassUID == SegmentationStorage:
        series = instance.ReferencedSeriesSequence[0]
        refs = [series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID]
        for frame in instance.PerFrameFunctionalGroupsSequence:
            derivation = frame.DerivationImageSequence[0].SourceImageSequence[0]
            refs.append(derivation.ReferencedSOPInstanceUID)
    else:
        study = instance.CurrentRequestedProcedureEvidenceSequence[0]
        assert study.StudyInstanceUID == source.StudyInstanceUID
        series = study.ReferencedSeriesSequence[0]
        refs = [series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert refs and all(ref == source.SOPInstanceUID for ref in refs)


def assert_iod_modules_complete(path):
    """highdicom's own IOD check (there is no dciodvfy here): every mandatory module of the instance's IOD, and the
    frame of reference where present, has its Type 1 and Type 2 attributes (presence only, top level; highdicom's
    tables list under the SR document content module the attributes of every content item value type, which a
    CONTAINER root does not have, so that module is checked by srread's parse of the content tree instead)."""
    from highdicom._iods import IOD_MODULE_MAP, SOP_CLASS_UID_IOD_KEY_MAP
    from highdicom._module_utils import check_required_attributes

    ds = pydicom.dcmread(path)
    modules = IOD_MODULE_MAP[SOP_CLASS_UID_IOD_KEY_MAP[ds.SOPClassUID]]
    checked = [m["key"] for m in modules if m["usage"] == "M" and m["key"] != "sr-document-content"]
    if "FrameOfReferenceUID" in ds:
        checked.append("frame-of-reference")
    for module in checked:
        check_required_attributes(ds, module, recursive=False)
    assert len(checked) >= 6  # SEG: 12 modules, SR: 6


@pytest.mark.parametrize("geometry", ["radiograph", "ct"])
def test_seg_and_sr_of_a_known_region(tmp_path, geometry):
    pixels = np.random.default_rng(0).integers(0, 4000, (ROWS, COLUMNS))
    if geometry == "ct":  # spacing, position, orientation and frame of reference, to be copied into the SEG
        ct = dict(pixel_spacing=(0.7, 0.8), position=(-10.0, 20.5, 33.0), modality="CT", sop_class=CTImageStorage)
        source_file = make_dicom_study(tmp_path / "ct.dcm", pixels, **ct)
    else:
        source_file = make_dicom_study(tmp_path / "cr.dcm", pixels, pixel_spacing=(0.15, 0.15))
    model = pretrained_model_path()
    save = SaveDicomSegSRd(
        output_dir=str(tmp_path / "out"), output_format="dicom", threshold=0.06, pixel_threshold=0.5, model_path=model
    )
    save(item(block_heatmap(source_file), score=0.25, abnormal=1, in_domain=0, domain_distance=3.5, p_value=0.01))
    stem = os.path.splitext(os.path.basename(source_file))[0]
    source = pydicom.dcmread(source_file)

    for kind in ("seg", "sr"):
        assert_iod_modules_complete(tmp_path / "out" / f"{stem}_{kind}.dcm")
    seg = pydicom.dcmread(tmp_path / "out" / f"{stem}_seg.dcm")
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (ROWS, COLUMNS, 1)
    assert_references_source(seg, source)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Anomaly region" and segment.SegmentAlgorithmType == "AUTOMATIC"
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(s) for s in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(s) for s in source.PixelSpacing]
    if geometry == "ct":
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        position = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
        assert [float(p) for p in position] == [float(p) for p in source.ImagePositionPatient]
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        assert [float(o) for o in orientation] == [float(o) for o in source.ImageOrientationPatient]
    expected = expected_block_mask()
    assert expected.sum() > 0
    np.testing.assert_array_equal(seg.pixel_array.reshape(ROWS, COLUMNS), expected)  # 1 bit per pixel, unpacked
    if geometry == "ct":  # highdicom's reader wants SliceThickness in the pixel measures, which radiographs lack
        read_back = hd.seg.segread(tmp_path / "out" / f"{stem}_seg.dcm")
        pixels = read_back.get_pixels_by_source_instance([source.SOPInstanceUID])
        np.testing.assert_array_equal(pixels[0, ..., 0], expected)

    sr = hd.sr.srread(tmp_path / "out" / f"{stem}_sr.dcm")
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert_references_source(sr, source)
    values, finding, evaluations, sources, texts = measurements(sr)
    assert values == pytest.approx(
        {
            "Anomaly score": 0.25,
            "Conformal p-value": 0.01,
            "Anomaly score threshold": 0.06,
            "Anomaly region pixel threshold": 0.5,
            "Training domain distance": 3.5,
        }
    )
    assert finding.meaning == "Abnormal" and evaluations == {"Within the training domain": "No"}
    assert sources == [source.SOPInstanceUID]
    assert texts["Algorithm Version"] == [__import__("bundle").__version__]
    assert f"model sha256 {sha256_of(model)}" in texts["Algorithm Parameters"]


def test_mask_mapping_matches_the_region_rule_on_a_random_heat_map():
    """Any heat map: the SEG mask is the model-grid region mask (smoothed heat above the pixel threshold, specks
    removed) sampled at the source pixels' centres, with rows and columns in DICOM's order."""
    heat = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.8
    heat[0, 10:30, 40:50] += 0.8
    labels, _ = region_mask(heat, 0.6)
    assert labels.max() > 0
    model_column = np.floor((np.arange(COLUMNS) + 0.5) * 64 / COLUMNS).astype(int)
    model_row = np.floor((np.arange(ROWS) + 0.5) * 64 / ROWS).astype(int)
    expected = (labels[model_column][:, model_row] > 0).T.astype(np.uint8)
    mask = source_grid_mask(heat, 0.6, ROWS, COLUMNS)
    assert mask.shape == (1, ROWS, COLUMNS)
    np.testing.assert_array_equal(mask[0], expected)
    three = source_grid_mask(heat, 0.6, ROWS, COLUMNS, frames=3, frame_index=-2)
    np.testing.assert_array_equal(three[1], expected)
    assert three[0].sum() == three[2].sum() == 0


def test_default_format_writes_nothing_and_unknown_formats_are_refused(tmp_path):
    source_file = make_dicom_study(tmp_path / "cr.dcm", np.full((ROWS, COLUMNS), 100))
    SaveDicomSegSRd(output_dir=str(tmp_path / "out"), pixel_threshold=0.5)(item(block_heatmap(source_file), score=0.1))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="output_format must be one of"):
        SaveDicomSegSRd(output_format="dcm")


def test_non_dicom_inputs_and_incomplete_headers_are_named_and_skipped(tmp_path, caplog):
    png = tmp_path / "chest.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    bare = make_dicom(tmp_path / "bare.dcm", np.full((ROWS, COLUMNS), 100))  # no patient or study: no SEG/SR can be
    save = SaveDicomSegSRd(output_dir=str(tmp_path / "out"), output_format="dicom", pixel_threshold=0.5)
    with caplog.at_level(logging.WARNING):
        for name in (png, bare):
            out = save(item(block_heatmap(name), score=0.1))
            assert torch.equal(out["heatmap"], block_heatmap(name))
    assert f"{png}: not a DICOM image" in caplog.text
    assert f"{bare}: cannot write a DICOM SEG" in caplog.text and f"{bare}: cannot write a DICOM SR" in caplog.text
    assert not any(f.startswith("chest") for f in os.listdir(tmp_path / "out"))


def test_inferring_with_dicom_output(tmp_path):
    """``run inferring --output_format dicom`` with the shipped model on a DICOM series of two images and a PNG: a
    SEG and an SR per DICOM image whose values are scores.csv's and whose mask is the region rule applied to the
    written heat map; the PNG is scored and named in a warning."""
    from PIL import Image

    from bundle.demo import make_demo_dataset

    sizes = {"train": (0, 0), "unlabeled": (0, 0), "val": (0, 0), "test": (1, 1)}
    images = os.path.join(make_demo_dataset(str(tmp_path / "demo"), sizes=sizes), "images")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pngs = sorted(f for f in os.listdir(images) if f.endswith(".png"))
    os.symlink(os.path.join(images, pngs[0]), inputs / "photo.png")
    for i, name in enumerate(pngs[:2]):  # the demo images as DICOM at another size (rows != columns)
        grey = np.asarray(Image.open(os.path.join(images, name)).convert("L").resize((COLUMNS * 2, ROWS * 2)))
        ct = dict(pixel_spacing=(0.2, 0.3), position=(0.0, 0.0, float(i)), modality="CT", sop_class=CTImageStorage)
        make_dicom_study(inputs / f"scan{i}.dcm", grey.astype(np.uint16) * 16, **ct)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json"]
    cmd += ["--ckpt_dir", str(tmp_path / "no_models"), "--input_path", str(inputs), "--output_dir", str(out)]
    proc = subprocess.run([*cmd, "--output_format", "dicom"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " - ERROR - " not in log, log[-4000:]
    assert f"{inputs / 'photo.png'}: not a DICOM image" in log
    produced = set(os.listdir(out))
    assert {"scan0_seg.dcm", "scan0_sr.dcm", "scan1_seg.dcm", "scan1_sr.dcm", "scores.csv"} <= produced
    assert not any(f.startswith("photo") and f.endswith(".dcm") for f in produced)

    settings = read_model(pretrained_model_path())[1]
    rows = {os.path.basename(r[0]): [float(v) for v in r[1:]] for r in csv.reader(open(out / "scores.csv"))}
    region_pixels = 0
    for i in range(2):
        source = pydicom.dcmread(inputs / f"scan{i}.dcm")
        score, abnormal, in_domain, distance, p_value = rows[f"scan{i}.dcm"]
        sr = hd.sr.srread(out / f"scan{i}_sr.dcm")
        assert_references_source(sr, source)
        values, finding, evaluations, _, texts = measurements(sr)
        assert values["Anomaly score"] == pytest.approx(score, rel=1e-6)
        assert values["Conformal p-value"] == pytest.approx(p_value, rel=1e-6)
        assert values["Training domain distance"] == pytest.approx(distance, rel=1e-6)
        assert values["Anomaly score threshold"] == pytest.approx(settings["threshold"], rel=1e-12)
        assert values["Anomaly region pixel threshold"] == pytest.approx(settings["pixel_threshold"], rel=1e-12)
        assert finding.meaning == ("Abnormal" if abnormal else "Normal")
        assert evaluations["Within the training domain"] == ("Yes" if in_domain else "No")
        assert "model file sagan_paediatric_cxr.pt" in texts["Algorithm Parameters"]

        seg = pydicom.dcmread(out / f"scan{i}_seg.dcm")
        assert_references_source(seg, source)
        assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (ROWS * 2, COLUMNS * 2, 1)
        # the heat map as written (64 x 64, MONAI's order: columns first) through the region rule, to the DICOM grid
        heat = np.asarray(nib.load(out / f"scan{i}_heatmap.nii.gz").dataobj, np.float32).reshape(64, 64)
        labels, _ = region_mask(torch.from_numpy(heat), settings["pixel_threshold"])
        model_column = np.floor((np.arange(COLUMNS * 2) + 0.5) * 64 / (COLUMNS * 2)).astype(int)
        model_row = np.floor((np.arange(ROWS * 2) + 0.5) * 64 / (ROWS * 2)).astype(int)
        expected = (labels[model_column][:, model_row] > 0).T
        read_back = hd.seg.segread(out / f"scan{i}_seg.dcm")
        np.testing.assert_array_equal(read_back.pixel_array.reshape(expected.shape), expected)
        region_pixels += int(expected.sum())
    assert region_pixels > 0  # the demo's abnormal image has regions: the comparison is not of two empty masks


def test_a_model_without_pixel_threshold_gets_the_sr_only(tmp_path, caplog):
    source_file = make_dicom_study(tmp_path / "cr.dcm", np.full((ROWS, COLUMNS), 100))
    save = SaveDicomSegSRd(output_dir=str(tmp_path / "out"), output_format="dicom", model_path=None)
    with caplog.at_level(logging.WARNING):
        save(item(block_heatmap(source_file), score=0.1))  # no threshold, decision, p-value or domain check either
    assert f"{source_file}: the model stores no pixel_threshold" in caplog.text
    assert sorted(os.listdir(tmp_path / "out")) == ["cr_sr.dcm"]
    values, finding, evaluations, sources, _ = measurements(hd.sr.srread(tmp_path / "out" / "cr_sr.dcm"))
    assert values == pytest.approx({"Anomaly score": 0.1}) and finding is None and evaluations == {}
    assert sources == [pydicom.dcmread(source_file).SOPInstanceUID]
