# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests of the Med-AD importers (scripts/import_medad.py, bundle/importers/) on small generated sources: DICOMs
with realistic tags (MONOCHROME1/2, 12 bits stored in 16, rescale slope/intercept, JPEG baseline), bad DICOMs, and
the CSVs in the formats of RSNA and VinDr-CXR."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import BasicTextSRStorage

from bundle.data import load_medad_datalist, select_unlabeled
from bundle.importers import ImporterError, Record, import_drawn, read_rsna, read_vindr
from bundle.transforms.io import load_grayscale

from .conftest import ROOT
from .dicom_files import make_dicom

_spec = importlib.util.spec_from_file_location("import_medad", os.path.join(ROOT, "scripts", "import_medad.py"))
import_medad = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_medad)
main = import_medad.main  # the command line, with its arguments as a list

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUIET = {"log": lambda message: None}


def pixels(seed, top=4095, shape=(40, 48)):
    """A smooth, non-constant image of integers in [0, top] (a gradient plus a seeded blob)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cy, cx = rng.uniform(5, 35), rng.uniform(5, 43)
    img = 0.5 * xx / shape[1] + 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)
    return np.round(img / img.max() * top).astype(np.int64)


# RSNA-like source: 20 normal, 14 "Lung Opacity" (two box rows each), 6 "No Lung Opacity / Not Normal", one DICOM
# not in the CSV; every fourth image MONOCHROME1, every fifth JPEG baseline 8-bit, some with rescale slope/intercept
RSNA_SIZES = ["--train-normal", "6", "--unlabeled-normal", "5", "--unlabeled-abnormal", "6"]
RSNA_SIZES += ["--val-size", "2", "--test-size", "4", "--size", "32", "--workers", "1"]


def rsna_source(root, n_normal=20, n_opacity=14, n_other=6, bad=None):
    images = root / "stage_2_train_images"
    images.mkdir(parents=True)
    rows = []
    classes = ["Normal"] * n_normal + ["Lung Opacity"] * n_opacity + ["No Lung Opacity / Not Normal"] * n_other
    for i, cls in enumerate(classes):
        pid = f"{i:04d}abcd-rsna"
        rows += [(pid, cls)] * (2 if cls == "Lung Opacity" else 1)
        jpeg = i % 5 == 0
        make_dicom(
            images / f"{pid}.dcm",
            pixels(i, top=255 if jpeg else 4095),
            photometric="MONOCHROME1" if i % 4 == 1 else "MONOCHROME2",
            slope=1.5 if i % 3 == 0 else None,
            intercept=-20.0 if i % 3 == 0 else None,
            jpeg=jpeg,
        )
    make_dicom(images / "ffffffff-notlisted.dcm", pixels(99))
    for pid, kind in (bad or {}).items():
        rows.append((pid, "Normal"))
        path = images / f"{pid}.dcm"
        if kind == "no pixel data":
            make_dicom(path, None)
        elif kind == "structured report":
            make_dicom(path, None, modality="SR", sop_class=BasicTextSRStorage)
        elif kind == "wrong modality":
            make_dicom(path, pixels(7), modality="CT")
        elif kind == "truncated":  # the download stopped inside the pixel data
            make_dicom(path, pixels(8))
            path.write_bytes(path.read_bytes()[:-1000])
        elif kind == "not dicom":
            path.write_text("<html>404 Not Found</html>")
        # "missing": listed in the CSV, no file
    with open(root / "stage_2_detailed_class_info.csv", "w", newline="") as f:
        csv.writer(f).writerows([("patientId", "class")] + rows)
    return images, root / "stage_2_detailed_class_info.csv", dict(rows)


def run_rsna(images, labels, out, *extra):
    return main(
        ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(out), *RSNA_SIZES, *extra], **QUIET
    )


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    images, labels, classes = rsna_source(root)
    run_rsna(images, labels, root / "out")
    return images, labels, classes, root / "out"


def test_rsna_sizes_labels_and_bundle_loads(rsna):
    images, labels, classes, out = rsna
    data = read_json(out / "data.json")
    counts = {
        "train/0": len(data["train"]["0"]),
        "unlabeled/0": len(data["train"]["unlabeled"]["0"]),
        "unlabeled/1": len(data["train"]["unlabeled"]["1"]),
        **{f"{s}/{k}": len(data[s][k]) for s in ("val", "test") for k in ("0", "1")},
    }
    assert counts == {
        "train/0": 6,
        "unlabeled/0": 5,
        "unlabeled/1": 6,
        "val/0": 2,
        "val/1": 2,
        "test/0": 4,
        "test/1": 4,
    }
    expected = {"Normal": "0", "Lung Opacity": "1"}
    for key, files in (
        [("0", data["train"]["0"])]
        + [(k, data[s][k]) for s in ("val", "test") for k in ("0", "1")]
        + [(k, data["train"]["unlabeled"][k]) for k in ("0", "1")]
    ):
        for name in files:
            assert expected[classes[name[: -len(".png")]]] == key, name  # "Not Normal" is never listed
    every = (
        data["train"]["0"]
        + sum(data["train"]["unlabeled"].values(), [])
        + sum([data[s][k] for s in ("val", "test") for k in ("0", "1")], [])
    )
    assert len(every) == len(set(every)) == 29 and sorted(os.listdir(out / "images")) == sorted(every)
    datalist = load_medad_datalist(str(out))
    img = load_grayscale(datalist.test[1][0])
    assert img.shape[0] == 1 and min(img.shape[1:]) == 32 and 0 <= img.min() < img.max() <= 1
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 29 and {r["patient_id"] + ".png" for r in rows} == set(every)
    info = read_json(out / "import.json")
    assert info["seed"] == 0 and info["counts"]["test/1"] == 4 and not os.path.exists(out / ".import-partial")


def test_rsna_pool_gives_the_anomaly_ratio_and_tu_mode_writes_it(rsna, tmp_path):
    _, _, _, out = rsna
    datalist = load_medad_datalist(str(out))
    tu = select_unlabeled(datalist, anomaly_ratio=0.6, size=5, seed=0)
    assert len(tu) == 5 and len(set(tu) & set(datalist.unlabeled_abnormal)) == 3
    images, labels, _, _ = rsna
    main(
        ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "tu"), *RSNA_SIZES]
        + ["--unlabeled", "tu", "--unlabeled-size", "5", "--anomaly-ratio", "0.6"],
        **QUIET,
    )
    unl = read_json(tmp_path / "tu" / "data.json")["train"]["unlabeled"]
    assert (len(unl["0"]), len(unl["1"])) == (2, 3)  # floor(0.6 * 5) abnormal, as bundle.data.select_unlabeled
    assert len(os.listdir(tmp_path / "tu" / "images")) == 6 + 5 + 4 + 8
    with pytest.raises(ImporterError, match=r"unlabeled/1 has 6 but 9 are needed"):
        main(
            ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "tu2"), *RSNA_SIZES]
            + ["--unlabeled", "tu", "--unlabeled-size", "10", "--anomaly-ratio", "0.9"],
            **QUIET,
        )


def test_rsna_reproducible_with_seed(rsna, tmp_path):
    images, labels, _, out = rsna
    run_rsna(images, labels, tmp_path / "again")
    assert (tmp_path / "again" / "data.json").read_bytes() == (out / "data.json").read_bytes()
    for name in os.listdir(out / "images"):
        assert (tmp_path / "again" / "images" / name).read_bytes() == (out / "images" / name).read_bytes()
    run_rsna(images, labels, tmp_path / "seed1", "--seed", "1")
    assert read_json(tmp_path / "seed1" / "data.json") != read_json(out / "data.json")


def test_rsna_not_normal_as_abnormal_and_wrong_csv(rsna, tmp_path):
    images, labels, _, _ = rsna
    records, _ = read_rsna(str(images), str(labels), not_normal="abnormal")
    assert sum(r.label == 1 for r in records) == 20 and sum(r.label == 0 for r in records) == 20
    boxes = tmp_path / "stage_2_train_labels.csv"
    boxes.write_text("patientId,x,y,width,height,Target\n0000abcd-rsna,,,,,0\n")
    with pytest.raises(ImporterError, match="stage_2_train_labels.csv: this is the box file.*detailed_class_info"):
        read_rsna(str(images), str(boxes))
    odd = tmp_path / "odd.csv"
    odd.write_text("patientId,class\n0000abcd-rsna,Normal\n0001abcd-rsna,Pneumonia\n")
    with pytest.raises(ImporterError, match=r"odd.csv, line 3: unknown class 'Pneumonia'"):
        read_rsna(str(images), str(odd))


def test_too_few_images_refused_with_counts_or_scaled(rsna, tmp_path):
    images, labels, _, _ = rsna
    with pytest.raises(ImporterError, match=r"has 20 normal and 14 abnormal images; the sizes need 8851 normal"):
        main(["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o")], **QUIET)
    assert not os.path.exists(tmp_path / "o")
    result = main(
        ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o")]
        + ["--scale-to-fit", "--size", "16", "--workers", "1", "--val-size", "400"],
        **QUIET,
    )
    got = {k: len(v) for k, v in result.splits.items()}
    # factor min(20 / 8851, 14 / 6012): every size scaled by the same factor, a non-zero size keeps at least 1
    assert got[("train", 0)] == 8 and got[("test", 0)] == got[("test", 1)] == 2 and got[("val", 0)] == 1
    assert (
        sum(v for (s, lab), v in got.items() if lab == 0) <= 20 and sum(v for (s, lab), v in got.items() if lab) <= 14
    )


@pytest.mark.parametrize(
    "kind,problem",
    [
        ("no pixel data", r"has no pixel data: not an image \(Computed Radiography Image Storage, modality CR\)"),
        ("structured report", r"has no pixel data: not an image \(Basic Text SR Storage, modality SR\)"),
        ("wrong modality", r"has modality 'CT'; expected one of CR, DX"),
        ("truncated", r"cannot read image"),
        ("not dicom", r"not a DICOM file"),
        ("missing", r"file not found"),
    ],
)
def test_bad_file_refused_naming_it(tmp_path, kind, problem):
    images, labels, _ = rsna_source(tmp_path, n_normal=0, n_opacity=0, n_other=0, bad={"badfile00": kind})
    with pytest.raises(ImporterError, match=rf"stage_2_train_images/badfile00\.dcm: {problem}"):
        main(
            ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out")]
            + ["--train-normal", "1", "--unlabeled-normal", "0", "--unlabeled-abnormal", "0"]
            + ["--val-size", "0", "--test-size", "0", "--workers", "1"],
            **QUIET,
        )
    assert not os.path.exists(tmp_path / "out")


def test_bad_files_skipped_counted_and_replaced(tmp_path):
    bad = {
        f"bad{i}": k
        for i, k in enumerate(
            ["no pixel data", "structured report", "wrong modality", "truncated", "not dicom", "missing"]
        )
    }
    images, labels, _ = rsna_source(tmp_path, n_normal=20, n_opacity=14, n_other=0, bad=bad)
    lines = []
    result = main(
        ["rsna", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out"), *RSNA_SIZES]
        + ["--on-bad-file", "skip"],
        log=lines.append,
    )
    assert sorted(os.path.basename(f) for f, _ in result.skipped) == sorted(f"{b}.dcm" for b in bad)
    assert len(result.splits[("train", 0)]) == 6 and len(result.splits[("test", 0)]) == 4  # refilled from the rest
    text = "\n".join(lines)
    assert "6 bad files skipped" in text and "bad2.dcm: has modality 'CT'" in text and "test/1" in text
    assert len(read_json(tmp_path / "out" / "import.json")["skipped"]) == 6


def test_monochrome1_inverted_12bit_rescaled_like_the_bundle(tmp_path):
    src = tmp_path / "normal"
    src.mkdir()
    ramp = (np.arange(40 * 48).reshape(40, 48) * 4095 // (40 * 48 - 1)).astype(np.uint16)
    m1 = make_dicom(src / "m1.dcm", ramp, photometric="MONOCHROME1", slope=2.0, intercept=-100.0)
    m2 = make_dicom(src / "m2.dcm", ramp, photometric="MONOCHROME2", slope=2.0, intercept=-100.0)
    main(["generic", "--normal", str(src), "--out", str(tmp_path / "out"), "--size", "0", "--workers", "1"], **QUIET)
    png1 = np.asarray(Image.open(tmp_path / "out" / "images" / "normal" / "m1.png"))
    png2 = np.asarray(Image.open(tmp_path / "out" / "images" / "normal" / "m2.png"))
    assert png1.dtype == np.uint8 and png1.shape == (40, 48)
    # stored value 0 is white in MONOCHROME1: bright = dense after the import
    assert png1[0, 0] == 255 and png1[-1, -1] == 0 and png2[0, 0] == 0 and png2[-1, -1] == 255
    assert np.array_equal(png1.astype(int), 255 - png2.astype(int))
    for dicom, png in ((m1, png1), (m2, png2)):  # the bundle reads the PNG as it reads the DICOM, up to 8-bit rounding
        direct = load_grayscale(dicom)
        imported = load_grayscale(str(tmp_path / "out" / "images" / "normal" / os.path.basename(dicom)[:-4]) + ".png")
        assert direct.shape == imported.shape and (direct - imported).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.allclose(imported[0].T, torch.as_tensor(png / 255.0, dtype=torch.float32))


def test_rerun_refused_unless_overwrite_and_failed_overwrite_keeps_old(rsna, tmp_path):
    images, labels, _, _ = rsna
    out = tmp_path / "out"
    run_rsna(images, labels, out)
    before = (out / "data.json").read_bytes()
    with pytest.raises(
        ImporterError, match=r"out: not empty \(data.json, images, import.json, labels.csv\).*--overwrite"
    ):
        run_rsna(images, labels, out)
    with pytest.raises(ImporterError, match=r"has 20 normal and 14 abnormal"):  # refused before any work
        run_rsna(images, labels, out, "--overwrite", "--train-normal", "50")
    with pytest.raises(ImporterError, match=r"\.dcm: has modality 'CR'; expected one of MG"):  # fails while converting
        run_rsna(images, labels, out, "--overwrite", "--modality", "MG")
    assert (out / "data.json").read_bytes() == before and not os.path.exists(out / ".import-partial")
    run_rsna(images, labels, out, "--overwrite", "--seed", "3")
    assert (out / "data.json").read_bytes() != before and len(os.listdir(out / "images")) == 29
    with pytest.raises(ImporterError, match="overlaps the input"):
        run_rsna(images, labels, images / "medad")


def test_vindr_every_reader_must_say_no_finding(tmp_path):
    images = tmp_path / "train"
    images.mkdir()
    rows = [("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")]
    for i in range(12):
        make_dicom(
            images / f"img{i:02d}.dicom",
            pixels(i),
            modality="DX",
            photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
        )
        for rad in ("R1", "R2", "R3"):
            finding = "No finding" if i < 6 or (i < 9 and rad != "R2") else "Nodule/Mass"
            rows.append((f"img{i:02d}", finding, "14", rad, "", "", "", ""))
    with open(tmp_path / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    records, notes = read_vindr(str(images), str(tmp_path / "train.csv"))
    assert [r.label for r in records] == [0] * 6 + [1] * 6  # img06-08: one reader of three found something
    assert any("no patient IDs" in n for n in notes)
    physionet = tmp_path / "image_labels_train.csv"
    physionet.write_text("image_id,rad_ID,Nodule/Mass,No finding\nimg00,R1,0,1\nimg00,R2,1,0\nimg01,R1,0,1\n")
    assert [r.label for r in read_vindr(str(images), str(physionet))[0]] == [1, 0]
    main(
        ["vindr", "--images", str(images), "--labels", str(tmp_path / "train.csv"), "--out", str(tmp_path / "out")]
        + ["--train-normal", "2", "--unlabeled-normal", "1", "--unlabeled-abnormal", "3", "--val-size", "1"]
        + ["--test-size", "2", "--size", "0", "--workers", "1"],
        **QUIET,
    )
    data = load_medad_datalist(str(tmp_path / "out"))
    normal = {f"img{i:02d}.png" for i in range(6)}
    assert all(os.path.basename(f) in normal for f in data.normal + data.test[0] + data.val[0] + data.unlabeled_normal)
    assert not any(os.path.basename(f) in normal for f in data.test[1] + data.val[1] + data.unlabeled_abnormal)


def test_lag_folders_attention_maps_skipped(tmp_path):
    root = tmp_path / "LAG"
    for folder, n in (("non_glaucoma", 10), ("suspicious_glaucoma", 8)):
        for sub in ("image", "attention_map"):
            (root / folder / sub).mkdir(parents=True)
            for i in range(n):
                rgb = np.stack([pixels(i, 255)] * 3, -1).astype(np.uint8)
                Image.fromarray(rgb).save(root / folder / sub / f"{folder[:3]}{i}.jpg", quality=95)
    args = ["lag", "--root", str(root), "--train-normal", "3", "--unlabeled-normal", "2", "--unlabeled-abnormal", "3"]
    args += ["--val-size", "1", "--test-size", "2", "--workers", "1", "--size", "32"]
    result = main(args + ["--out", str(tmp_path / "out")], **QUIET)
    every = [r for v in result.splits.values() for r in v]
    assert all("/image/" in r.source for r in every) and len(every) == 3 + 2 + 3 + 2 + 4
    assert all(r.name.startswith("non_glaucoma/") for k, v in result.splits.items() if k[1] == 0 for r in v)
    assert all(r.name.startswith("suspicious_glaucoma/") for k, v in result.splits.items() if k[1] == 1 for r in v)
    os.rename(root / "suspicious_glaucoma", root / "GON")
    with pytest.raises(ImporterError, match=r"LAG: none of the abnormal class folders.*--abnormal-dir"):
        main(args + ["--out", str(tmp_path / "out2")], **QUIET)
    main(args + ["--out", str(tmp_path / "out2"), "--abnormal-dir", "GON"], **QUIET)
    assert len(load_medad_datalist(str(tmp_path / "out2")).test[1]) == 2


def tiny_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(seed, 255, (12, 12)).astype(np.uint8)).save(path)
    return str(path)


def test_draw_keeps_patients_whole_and_exact_sizes(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for p in range(50):  # 1-3 images per patient; every fifth patient has normal and abnormal images
        n = int(rng.integers(1, 4))
        labels = [j % 2 for j in range(n + 1)] if p % 5 == 0 else [p % 2] * n
        for j, lab in enumerate(labels):
            name = f"p{p:02d}_{j}.png"
            records.append(Record(tiny_png(tmp_path / "src" / name, p * 3 + j), int(lab), name, patient=f"P{p:02d}"))
    targets = {("test", 0): 5, ("test", 1): 5, ("val", 0): 3, ("val", 1): 3, ("train", 0): 10}
    targets.update({("unlabeled", 0): None, ("unlabeled", 1): None})
    result = import_drawn("generic", records, str(tmp_path / "out"), targets, seed=4, **QUIET)
    splits_of = {}
    for (split, lab), recs in result.splits.items():
        if targets[(split, lab)] is not None:
            assert len(recs) == targets[(split, lab)], (split, lab)
        for r in recs:
            splits_of.setdefault(r.patient, set()).add(split)
    assert all(len(s) == 1 for s in splits_of.values()), splits_of
    placed = sum(len(v) for v in result.splits.values())
    assert placed + result.unused == len(records)
    load_medad_datalist(str(tmp_path / "out"))


def test_generic_csvs_patients_and_val_carved_from_test(tmp_path):
    src = tmp_path / "src"
    normal_rows, labelled_rows = [("path", "patient_id")], [("path", "label", "split", "patient_id")]
    for i in range(6):
        normal_rows.append((os.path.relpath(tiny_png(src / "n" / f"n{i}.png", i), tmp_path), f"N{i}"))
    for p in range(8):  # two images per test patient
        for j in range(2):
            path = tiny_png(src / "t" / f"t{p}_{j}.png", 50 + 2 * p + j)
            labelled_rows.append((os.path.relpath(path, tmp_path), str(p % 2), "test", f"T{p}"))
    for name, rows in (("normal.csv", normal_rows), ("labelled.csv", labelled_rows)):
        with open(tmp_path / name, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    unl = tmp_path / "unl"
    for i in range(3):
        tiny_png(unl / f"u{i}.png", 100 + i)
    args = ["generic", "--normal", str(tmp_path / "normal.csv"), "--labelled", str(tmp_path / "labelled.csv")]
    args += ["--unlabeled", str(unl), "--workers", "1"]
    lines = []
    result = main(args + ["--out", str(tmp_path / "out"), "--val-size", "2"], log=lines.append)
    data = load_medad_datalist(str(tmp_path / "out"))
    assert len(data.normal) == 6 and len(data.unlabeled_normal) == 3 and not data.unlabeled_abnormal
    assert [len(data.val[0]), len(data.val[1]), len(data.test[0]), len(data.test[1])] == [2, 2, 6, 6]
    for seed in range(4):  # val patients are drawn whole, whatever the seed
        if seed:
            result = main(
                args + ["--out", str(tmp_path / f"out{seed}"), "--val-size", "2", "--seed", str(seed)], **QUIET
            )
        val_patients = {r.patient for k, v in result.splits.items() if k[0] == "val" for r in v}
        test_patients = {r.patient for k, v in result.splits.items() if k[0] == "test" for r in v}
        assert len(val_patients) == 2 and not val_patients & test_patients
    assert "--anomaly_ratio 0" in "\n".join(lines)
    with open(tmp_path / "out" / "labels.csv") as f:
        assert {r["label"] for r in csv.DictReader(f) if r["split"] == "unlabeled"} == {""}
    other = tiny_png(src / "t" / "n0_followup.png", 200)
    labelled_rows.append((os.path.relpath(other, tmp_path), "1", "test", "N0"))  # N0 is also a known normal
    with open(tmp_path / "labelled.csv", "w", newline="") as f:
        csv.writer(f).writerows(labelled_rows)
    with pytest.raises(ImporterError, match=r"1 patient\(s\) have images in more than one split \(N0: test, train\)"):
        main(args + ["--out", str(tmp_path / "out2")], **QUIET)


def test_files_left_by_an_interrupted_publish_are_removed(tmp_path):
    for i in range(2):
        tiny_png(tmp_path / "normal" / f"n{i}.png", i)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".partial-k1ll3d.json").write_text('{"train": ')  # a kill between data.json's write and its rename
    main(["generic", "--normal", str(tmp_path / "normal"), "--out", str(out), "--workers", "1"], **QUIET)
    assert sorted(os.listdir(out)) == ["data.json", "images", "import.json", "labels.csv"]


@pytest.mark.parametrize("source", ["rsna", "vindr", "lag", "generic"])
def test_help_explains_options(source, capsys):
    with pytest.raises(SystemExit) as e:
        main([source, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--on-bad-file" in text and "--out" in text and "8-bit grey PNG" in text
    if source != "generic":
        assert "--scale-to-fit" in text and "--val-size" in text and "--anomaly-ratio" in text
