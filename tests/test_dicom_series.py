"""A DICOM series as one volume at inference (issue 23): a folder of CT instances of one series, in shuffled file
order and with reversed InstanceNumbers, is read as one volume sorted by position, scored slice by slice by the
foreground rule, gets one volumes.csv row, 3D NIfTI maps in the series' geometry and, with ``--output_format dicom``,
one DICOM SEG referencing every instance and one SR with the volume's result."""

import csv
import os
import random
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from bundle.data import DatalistError, list_images
from bundle.handlers.volume_aggregator import VOLUME_COLUMNS
from bundle.transforms.io import find_dicom_series, read_volume
from bundle.volumes import expand_volumes, foreground_slices, slice_row_name

from .conftest import ROOT
from .dicom_files import make_dicom_study
from .test_dicom_output import assert_iod_modules_complete

hd = pytest.importorskip("highdicom")

SIZE, DEPTH = 48, 12
BLOB_SLICES = (5, 6)
EMPTY_SLICES = (0, 1, 11)
CAP_SLICE = 10  # a few pixels of anatomy: under 5% of the slice, not scored
SPACING = (0.7, 0.8)  # PixelSpacing: between rows, between columns (mm)
STEP = 2.5  # mm between slices
ORIGIN = np.array([-10.0, 20.0, -50.0])
# an oblique orientation: row direction and column direction (unit, orthogonal), normal = their cross product
ROW_DIRECTION = np.array([1.0, 0.0, 0.0])
COLUMN_DIRECTION = np.array([0.0, 0.8, -0.6])
NORMAL = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)  # (0, 0.6, 0.8)


def blob_disc(radius: int = 6) -> np.ndarray:
    """(SIZE, SIZE) bool, (rows, columns): the blob."""
    row, column = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    return (row - 30) ** 2 + (column - 14) ** 2 < radius**2


def phantom() -> np.ndarray:
    """(DEPTH, SIZE, SIZE) HU, slice k in position order, (rows, columns): air, empty slices 0, 1 and 11, a cap of
    3 x 3 pixels on slice 10, a smooth ellipse growing from slice 2 to 9 and a bright blob on slices 5 and 6."""
    row, column = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    hu = np.full((DEPTH, SIZE, SIZE), -1000.0)
    for k in range(2, CAP_SLICE):
        scale = 1.0 + 0.02 * (k - 2)  # growing: no two slices alike, the order matters
        r = ((row - 24) / (18 * scale)) ** 2 + ((column - 22) / (15 * scale)) ** 2
        hu[k] += np.clip(1 - r, 0, None) * 400 + 100 * (r < 1)
    hu[CAP_SLICE, 22:25, 18:21] = -700
    for k in BLOB_SLICES:
        hu[k][blob_disc(6 if k == BLOB_SLICES[0] else 5)] = 1000
    return np.floor(hu)  # whole HU, as stored


def make_series(folder, seed: int = 0) -> list[str]:
    """The phantom as a CT series of DEPTH instances in ``folder``: file names shuffled against position and
    InstanceNumber reversed, so that neither gives the order. Returns the SOP Instance UIDs in position order."""
    os.makedirs(folder, exist_ok=True)
    hu = phantom()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    names = list(range(DEPTH))
    random.Random(seed).shuffle(names)
    uids = []
    for k in range(DEPTH):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "SERIES1", "Test^Series"
        ds.PatientBirthDate, ds.PatientSex = "20000101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "ACC2", ""
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber = "20240102", "101500", 4
        ds.InstanceNumber = DEPTH - k
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([ROW_DIRECTION, COLUMN_DIRECTION])]
        ds.ImagePositionPatient = [float(v) for v in ORIGIN + STEP * k * NORMAL]
        ds.PixelSpacing, ds.SliceThickness = list(SPACING), STEP
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[k] + 1024).astype(np.uint16).tobytes()
        ds.save_as(os.path.join(folder, f"IM{names[k]:04d}"), enforce_file_format=True)  # no suffix, as PACS write
        uids.append(ds.SOPInstanceUID)
    return uids


def expected_affine() -> np.ndarray:
    """(4, 4) voxel -> RAS of the series as MONAI orders a DICOM image: axis 0 along the columns index (the row
    direction), axis 1 along the rows, axis 2 the slices in position order."""
    affine = np.eye(4)
    affine[:3, 0] = ROW_DIRECTION * SPACING[1]
    affine[:3, 1] = COLUMN_DIRECTION * SPACING[0]
    affine[:3, 2] = NORMAL * STEP
    affine[:3, 3] = ORIGIN
    affine[:2] *= -1
    return affine


def run_inferring(input_path, out, *extra) -> str:
    """``run inferring`` with the shipped model (no models/ in ckpt_dir); returns its log."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json"]
    cmd += ["--ckpt_dir", str(out) + "_no_models", "--input_path", str(input_path), "--output_dir", str(out)]
    proc = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " - ERROR - " not in log, log[-6000:]
    return log


def series_uids(folder) -> tuple[str, list[str]]:
    """The SeriesInstanceUID and the SOP Instance UIDs (position order) of a series written by :func:`make_series`,
    read back from its files."""
    headers = [pydicom.dcmread(os.path.join(folder, f), stop_before_pixels=True) for f in os.listdir(folder)]
    headers.sort(key=lambda ds: np.dot([float(v) for v in ds.ImagePositionPatient], NORMAL))
    return str(headers[0].SeriesInstanceUID), [str(ds.SOPInstanceUID) for ds in headers]


def test_a_series_folder_is_one_volume_sorted_by_position(tmp_path):
    inputs = tmp_path / "inputs"
    uids = make_series(inputs / "ct")
    xray = make_dicom_study(inputs / "chest.dcm", np.full((40, 56), 200), pixel_spacing=(0.2, 0.2))
    # the series is one item after the folder's own files; its instances are not listed, the radiograph is
    assert list_images(str(inputs)) == [{"image": xray}, {"image": str(inputs / "ct")}]
    assert list_images(str(inputs / "ct") + os.sep) == [{"image": str(inputs / "ct")}]

    series = find_dicom_series(str(inputs / "ct"))
    assert series.sop_instance_uids == tuple(uids) and series.depth == DEPTH
    assert (series.rows, series.columns) == (SIZE, SIZE)
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in series.files] == list(range(DEPTH, 0, -1))
    assert sorted(series.files) != list(series.files)  # file order is not position order
    volume = read_volume(str(inputs / "ct"))
    assert tuple(volume.shape) == (1, SIZE, SIZE, DEPTH) and volume.meta["filename_or_obj"] == str(inputs / "ct")
    np.testing.assert_allclose(volume[0].numpy(), np.transpose(phantom(), (2, 1, 0)))  # (columns, rows, slices)
    np.testing.assert_allclose(volume.meta["original_affine"], expected_affine(), atol=1e-9)

    items = expand_volumes(list_images(str(inputs)), -1)
    scored = [i["slice_index"] for i in items if i["image"] == str(inputs / "ct")]
    assert scored == foreground_slices(np.transpose(phantom(), (2, 1, 0)), 2) == list(range(2, CAP_SLICE))
    assert [i for i in items if i["image"] == xray] == [{"image": xray}]  # the radiograph as before


def test_a_folder_with_two_series_is_refused_by_name(tmp_path):
    make_series(tmp_path / "mixed", seed=1)
    other = tmp_path / "other"
    make_series(other, seed=2)
    for f in os.listdir(other):
        os.rename(other / f, tmp_path / "mixed" / f"B{f}")
    with pytest.raises(DatalistError, match=f"{tmp_path / 'mixed'}: holds 2 DICOM series"):
        list_images(str(tmp_path))


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    """``run inferring --output_format dicom`` on a folder holding a radiograph and, below it, the CT series."""
    root = tmp_path_factory.mktemp("series")
    inputs = root / "inputs"
    uids = make_series(inputs / "ct")
    make_dicom_study(inputs / "chest.dcm", np.random.default_rng(0).integers(0, 4000, (40, 56)), (0.2, 0.2))
    log = run_inferring(inputs, root / "out", "--output_format", "dicom")
    return root, uids, log


def test_inferring_scores_the_series_as_one_volume(inferred):
    root, uids, log = inferred
    out, folder = root / "out", str(root / "inputs" / "ct")
    rows = {r[0]: float(r[1]) for r in csv.reader(open(out / "scores.csv"))}
    slice_rows = {name: score for name, score in rows.items() if name.startswith(folder)}
    scored = foreground_slices(np.transpose(phantom(), (2, 1, 0)), 2)
    assert list(slice_rows) == [slice_row_name(folder, k) for k in scored]
    assert set(rows) - set(slice_rows) == {str(root / "inputs" / "chest.dcm")}  # the radiograph: one row, as before

    table = list(csv.DictReader(open(out / "volumes.csv")))
    assert len(table) == 1 and list(table[0]) == list(VOLUME_COLUMNS)
    row = table[0]
    assert row["file"] == folder and int(row["slices"]) == DEPTH and int(row["slices_scored"]) == len(scored)
    top = int(row["top_slice"])
    assert top in BLOB_SLICES and max(slice_rows, key=slice_rows.get) == slice_row_name(folder, top)
    assert f"at slice {top} (SOP Instance UID {uids[top]})" in log

    for kind in ("heatmap", "label"):
        image = nib.load(out / f"ct_{kind}.nii.gz")
        assert image.shape == (SIZE, SIZE, DEPTH)
        np.testing.assert_allclose(image.affine, expected_affine(), atol=1e-5)
    heat = nib.load(out / "ct_heatmap.nii.gz").get_fdata()
    inside = {k: heat[..., k][blob_disc().T].mean() for k in scored}  # the blob raises the heat where it is
    assert min(inside[k] for k in BLOB_SLICES) > 1.5 * max(v for k, v in inside.items() if k not in BLOB_SLICES)
    assert not heat[..., [k for k in range(DEPTH) if k not in scored]].any()
    # the radiograph's outputs as before; ONE set for the series, nothing per instance or per slice
    assert sorted(os.listdir(out)) == [
        "chest_heatmap.nii.gz", "chest_heatmap.png", "chest_seg.dcm", "chest_sr.dcm",
        "ct_heatmap.nii.gz", "ct_label.nii.gz", "ct_seg.dcm", "ct_sr.dcm", "scores.csv", "volumes.csv",
    ]  # fmt: skip


def test_the_series_seg_references_every_instance_and_lies_on_it(inferred):
    root, uids, _ = inferred
    out, folder = root / "out", root / "inputs" / "ct"
    series_uid, _ = series_uids(folder)
    for kind in ("seg", "sr"):
        assert_iod_modules_complete(out / f"ct_{kind}.dcm")
    seg = pydicom.dcmread(out / "ct_seg.dcm")
    assert seg.SOPClassUID == SegmentationStorage and seg.SeriesInstanceUID != series_uid
    assert len(seg.ReferencedSeriesSequence) == 1 and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    referenced = [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert sorted(referenced) == sorted(uids)

    label = np.asarray(nib.load(out / "ct_label.nii.gz").dataobj)  # (columns, rows, slices)
    with_regions = [k for k in range(DEPTH) if label[..., k].any()]
    assert with_regions and set(with_regions) <= set(range(2, CAP_SLICE))
    frames = seg.pixel_array.reshape(-1, SIZE, SIZE)
    by_position = {
        pydicom.dcmread(os.path.join(folder, f), stop_before_pixels=True).SOPInstanceUID: f for f in os.listdir(folder)
    }
    on = []
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source_uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uids.index(source_uid)
        on.append(k)
        np.testing.assert_array_equal(frame, label[..., k].T)  # the frame is its instance's slice of the label map
        source = pydicom.dcmread(os.path.join(folder, by_position[source_uid]), stop_before_pixels=True)
        position = group.PlanePositionSequence[0].ImagePositionPatient
        assert [float(p) for p in position] == [float(p) for p in source.ImagePositionPatient]
    assert sorted(on) == with_regions and len(set(on)) == len(on)  # one frame per slice with regions (highdicom
    # orders the frames itself)


def test_the_series_sr_holds_the_volume_row(inferred):
    root, uids, _ = inferred
    row = next(csv.DictReader(open(root / "out" / "volumes.csv")))
    series_uid, _ = series_uids(root / "inputs" / "ct")
    sr = hd.sr.srread(root / "out" / "ct_sr.dcm")
    # the series as evidence: the top slice's instance (referenced in the content) as current evidence, the others
    # as pertinent other evidence (highdicom's split)
    referenced = []
    for kind in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(kind, []):
            assert [s.SeriesInstanceUID for s in study.ReferencedSeriesSequence] == [series_uid]
            referenced += [r.ReferencedSOPInstanceUID for r in study.ReferencedSeriesSequence[0].ReferencedSOPSequence]
    assert sorted(referenced) == sorted(uids)
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in group.get_measurements()}
    assert values["Volume anomaly score"] == pytest.approx(float(row["volume_score"]), rel=1e-6)
    assert values["Top slice index"] == int(row["top_slice"])
    assert values["Conformal p-value"] == pytest.approx(float(row["p_value_of_top_slice"]), rel=1e-6)
    assert values["Volume p-value"] == pytest.approx(float(row["volume_p_value"]), rel=1e-6)
    assert values["Scored slices"] == int(row["slices_scored"]) and values["Slices"] == DEPTH
    assert group.finding_type.meaning == ("Abnormal" if int(row["abnormal"]) else "Normal")
    top_uid = uids[int(row["top_slice"])]
    assert [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in group.source_images] == [top_uid]


def test_radiographs_of_one_series_and_inconsistent_series_stay_2d_files(tmp_path, caplog):
    """Two CR views in one series (no position or orientation) are two 2D images, as before; a CT series whose
    instances differ in size is not a volume either, and a warning names its folder."""
    xrays = tmp_path / "xrays"
    xrays.mkdir()
    files = [make_dicom_study(xrays / f"view{i}.dcm", np.full((40, 56), 100 + i), (0.2, 0.2)) for i in range(2)]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(f, enforce_file_format=True)
    assert list_images(str(xrays)) == [{"image": f} for f in files]

    ct = tmp_path / "ct"
    make_series(ct)
    names = sorted(os.listdir(ct))
    for name in names:
        os.rename(ct / name, ct / f"{name}.dcm")
    ds = pydicom.dcmread(ct / f"{names[0]}.dcm")
    ds.Rows = ds.Columns = SIZE // 2
    ds.PixelData = np.zeros((SIZE // 2, SIZE // 2), np.uint16).tobytes()
    ds.save_as(ct / f"{names[0]}.dcm", enforce_file_format=True)
    with caplog.at_level("WARNING"):
        items = list_images(str(ct))
    assert items == [{"image": str(ct / f"{name}.dcm")} for name in names]
    assert f"{ct}: series " in caplog.text and "different Rows x Columns" in caplog.text


def test_volumes_with_the_same_name_get_distinct_outputs(tmp_path, caplog):
    """Two series folders both named CT (p1/CT, p2/CT) and a CT.nii.gz: no output file replaces another."""
    from bundle.handlers import VolumeAggregator

    aggregator = VolumeAggregator(output_dir=str(tmp_path))
    names = [aggregator._output_name(str(tmp_path / p)) for p in ("p1/CT", "p2/CT", "CT.nii.gz", "CT_2")]
    assert names == ["CT", "CT_2", "CT_3", "CT_2_2"]
    assert "another volume's outputs are named CT_*: this one's are CT_2_*" in caplog.text
    assert aggregator._output_name(".") == os.path.basename(os.getcwd())  # never hidden "._seg.dcm" files
