"""3D volumes scored slice by slice at inference (issue 23, part 2): the foreground rule, the slice items and their
loading, the rows of scores.csv, the per-volume aggregate (volumes.csv) and the 3D heat and label maps in the
input's geometry; 2D inputs keep their rows."""

import csv
import logging
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.data import DatalistError, list_images
from bundle.handlers import VolumeAggregator
from bundle.handlers.volume_aggregator import VOLUME_COLUMNS, volume_p_value
from bundle.transforms import DecodeMixedMetad, LoadGrayscaleImaged, collate_mixed_meta, io
from bundle.transforms.io import BadImageError, load_grayscale, load_grayscale_slice, volume_slice
from bundle.volumes import expand_volumes, foreground_slices, score_row_meta, slice_row_name

from .conftest import ROOT

SHAPE = (48, 40, 12)  # in-plane not square
LESION_SLICE = 6
LESION_CENTRE, LESION_RADIUS = (30, 14), 6
EMPTY_SLICES = (0, 1, 11)
CAP_SLICE = 10  # a few pixels of anatomy: under 5% of the slice, not scored
# a non-identity affine: axes swapped, anisotropic spacing, a shear and an offset
AFFINE = np.array([[0.0, 0.8, 0.0, 10.0], [0.9, 0.0, 0.1, -5.0], [0.0, 0.0, 2.5, 3.0], [0.0, 0.0, 0.0, 1.0]])


def lesion_disc() -> np.ndarray:
    """(48, 40) bool: where the lesion is on its slice."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    return (x - LESION_CENTRE[0]) ** 2 + (y - LESION_CENTRE[1]) ** 2 < LESION_RADIUS**2


def make_volume(path) -> np.ndarray:
    """A (48, 40, 12) float32 NIfTI: empty slices 0, 1 and 11, a cap of 3 x 3 pixels on slice 10, a smooth ellipse
    (slightly larger towards the middle) on slices 2-9 and an extreme bright disc, the lesion, on slice 6."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    volume = np.zeros(SHAPE, np.float32)
    for k in range(2, CAP_SLICE):
        scale = 1.0 + 0.03 * (4 - abs(k - 5.5))
        r = ((x - 24) / (18 * scale)) ** 2 + ((y - 20) / (15 * scale)) ** 2
        volume[..., k] = np.clip(1 - r, 0, None) * 400 + 100 * (r < 1)
    volume[22:25, 18:21, CAP_SLICE] = 300
    volume[..., LESION_SLICE][lesion_disc()] = 2000
    nib.save(nib.Nifti1Image(volume, AFFINE), str(path))
    return volume


def run_inferring(input_path, out, *extra) -> str:
    """``run inferring`` with the shipped model (no models/ in ckpt_dir); returns its log."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json"]
    cmd += ["--ckpt_dir", str(out) + "_no_models", "--input_path", str(input_path), "--output_dir", str(out)]
    proc = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_foreground_rule_drops_empty_slices_and_caps_along_any_axis(tmp_path):
    volume = make_volume(tmp_path / "v.nii.gz")
    expected = [k for k in range(SHAPE[2]) if k not in EMPTY_SLICES + (CAP_SLICE,)]
    assert foreground_slices(volume, 2) == foreground_slices(volume, -1) == expected
    assert foreground_slices(np.moveaxis(volume, 2, 0), 0) == expected
    assert foreground_slices(torch.as_tensor(np.moveaxis(volume, 2, 1)), 1) == expected
    # CT-like: air at -1000 HU (and padding at -3024 on a few voxels) is background, soft tissue is not
    ct = np.full(SHAPE, -1000.0, np.float32)
    ct[:2, :2] = -3024.0
    ct[10:40, 8:32, 3:9] = 40.0
    assert foreground_slices(ct, 2) == list(range(3, 9))
    assert foreground_slices(np.zeros(SHAPE), 2) == [] and foreground_slices(np.full(SHAPE, np.nan), 2) == []
    with pytest.raises(ValueError, match="volume"):
        foreground_slices(volume[..., 0], 2)


def test_expand_volumes_turns_each_volume_into_its_slice_items(tmp_path, caplog):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((30, 20)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    volume_values = make_volume(tmp_path / "b_volume.nii.gz")
    nib.save(nib.Nifti1Image(np.random.rand(30, 20).astype(np.float32), np.eye(4)), tmp_path / "c_flat.nii.gz")
    nib.save(nib.Nifti1Image(np.random.rand(30, 20, 1).astype(np.float32), np.eye(4)), tmp_path / "d_slab.nii.gz")
    items = list_images(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="bundle.volumes"):
        expanded = expand_volumes(items, 2)
    assert "8 of 12 slices along axis 2 hold foreground" in caplog.text
    volume = str(tmp_path / "b_volume.nii.gz")
    scored = [k for k in range(SHAPE[2]) if k not in EMPTY_SLICES + (CAP_SLICE,)]
    assert expanded == (
        [items[0]] + [{"image": volume, "slice_index": k, "slice_axis": 2} for k in scored] + items[2:]
    )  # in the volume's place, the other items unchanged
    along_x = [e for e in expand_volumes(items, -3) if "slice_index" in e]
    assert [e["slice_index"] for e in along_x] == foreground_slices(volume_values, 0)
    assert {e["slice_axis"] for e in along_x} == {0} and 10 < len(along_x) < SHAPE[0]
    assert expand_volumes(items, None) == items  # off: the loader refuses volumes, as before
    assert expand_volumes(items, 2, model_slice_index=5) == items  # the model's own slice of each volume
    with pytest.raises(ValueError, match="slice_axis must be an axis"):
        expand_volumes(items, 3)
    series = tmp_path / "series" / "t.nii.gz"  # 4D (time, channels): the loader decides, as before
    series.parent.mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 4, 3).astype(np.float32), np.eye(4)), series)
    assert expand_volumes(list_images(str(series)), 2) == list_images(str(series))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 4), np.float32), np.eye(4)), tmp_path / "empty.nii.gz")
    assert expand_volumes(list_images(str(tmp_path / "empty.nii.gz")) + items[:1], 2) == items[:1]
    with pytest.raises(DatalistError, match="no image to score"):
        expand_volumes(list_images(str(tmp_path / "empty.nii.gz")), 2)


def test_a_slice_item_loads_its_slice_from_one_decoding_of_the_volume(tmp_path, monkeypatch):
    volume = make_volume(tmp_path / "v.nii.gz")
    path = str(tmp_path / "v.nii.gz")
    # along the last axis: exactly the image the model's slice_index gives
    for k in (2, LESION_SLICE, -3):
        alone = load_grayscale(path, k)
        sliced = load_grayscale_slice(path, k)
        assert torch.equal(sliced.as_tensor(), alone.as_tensor())
        assert volume_slice(sliced.meta) == (2, k % SHAPE[2]) and volume_slice(alone.meta) is None
        assert list(sliced.meta["spatial_shape"]) == list(SHAPE)
    # along the first axis: the (40, 12) plane x = 30, min-max scaled over the slice
    plane = load_grayscale_slice(path, 30, 0)
    expected = (volume[30] - volume[30].min()) / (volume[30].max() - volume[30].min())
    assert plane.shape == (1, 40, 12) and np.allclose(plane[0].numpy(), expected, atol=1e-6)
    with pytest.raises(BadImageError, match="slice_index 12 outside a volume of 12 slices along axis 2"):
        load_grayscale_slice(path, 12, 2)
    with pytest.raises(BadImageError, match="slice_axis 3"):
        load_grayscale_slice(path, 0, 3)
    # one decoding for consecutive slices of a volume, a new one when the file changes
    reads = []
    original = io._read_checked
    monkeypatch.setattr(io, "_read_checked", lambda f, loader: reads.append(f) or original(f, loader))
    monkeypatch.setattr(io, "_last_volume", None)
    transform = LoadGrayscaleImaged("image")
    loaded = [transform({"image": path, "slice_index": k, "slice_axis": 2}) for k in range(2, 10)]
    assert len(reads) == 1 and all(set(d) == {"image"} for d in loaded)  # the slice keys are taken out of the item
    loaded[0]["image"].meta["affine"] = torch.zeros(4, 4)  # a slice's metadata is its own
    assert np.allclose(transform({"image": path, "slice_index": 2})["image"].meta["affine"].numpy(), AFFINE)
    nib.save(nib.Nifti1Image(volume * 2, AFFINE), path)
    os.utime(path, ns=(0, 10**9))
    transform({"image": path, "slice_index": 3, "slice_axis": 2})
    assert len(reads) == 2
    # items without the keys: as before (the model's slice_index, or a 2D image)
    assert volume_slice(LoadGrayscaleImaged("image", slice_index=4)({"image": path})["image"].meta) is None


def test_slice_metadata_survives_a_batch_with_2d_images_and_names_the_rows(tmp_path):
    from monai.data import decollate_batch
    from monai.transforms import Resized
    from PIL import Image

    make_volume(tmp_path / "v.nii.gz")
    Image.fromarray(np.full((30, 20), 128, np.uint8)).save(tmp_path / "a.png")
    load, resize = LoadGrayscaleImaged("image"), Resized("image", (8, 8))
    items = [{"image": str(tmp_path / "a.png")}] + [
        {"image": str(tmp_path / "v.nii.gz"), "slice_index": k, "slice_axis": 2} for k in (3, 4)
    ]
    decollated = decollate_batch(collate_mixed_meta([resize(load(item)) for item in items]))
    rows = score_row_meta(decollated)
    assert [r["filename_or_obj"] for r in rows] == [
        str(tmp_path / "a.png"),
        slice_row_name(str(tmp_path / "v.nii.gz"), 3),
        str(tmp_path / "v.nii.gz") + "#slice=4",
    ]
    decoded = [DecodeMixedMetad("image")(d)["image"].meta for d in decollated]
    assert [volume_slice(m) for m in decoded] == [None, (2, 3), (2, 4)]


def _slice_item(k: int, score: float, affine: np.ndarray) -> dict:
    """A postprocessed item of slice k along axis 0 of a (10, 24, 16) volume: an (8, 8) heat map k / 10 on its
    middle (6, 6), the score, its decision at 0.5 and a p-value."""
    from monai.data import MetaTensor

    meta = {
        "filename_or_obj": "/data/scan.nii",
        "spatial_shape": np.array([10, 24, 16]),
        "original_affine": affine,
        "slice_index": np.array([k]),
        "slice_axis": np.array([0]),
    }
    heat = torch.zeros(1, 8, 8)
    heat[0, 1:7, 1:7] = k / 10
    return {
        "image": MetaTensor(torch.zeros(1, 8, 8), meta=meta),
        "heatmap": heat,
        "score": torch.tensor([score]),
        "abnormal": torch.tensor([float(score > 0.5)]),
        "p_value": torch.tensor([0.5 - score / 2]),
    }


def test_aggregator_puts_each_slice_back_in_the_volume_along_its_axis(tmp_path):
    """Slices along axis 0 of a (10, 24, 16) volume: heat maps resized to (24, 16) in place, zeros elsewhere;
    volumes.csv's aggregate, the Bonferroni p-value and the alpha decision."""
    from monai.data import MetaTensor

    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    scores = {3: 0.2, 4: 0.7, 6: 0.4}
    aggregator = VolumeAggregator(str(tmp_path), threshold=0.5, pixel_threshold=0.3)
    for k, score in scores.items():
        aggregator.add(_slice_item(k, score, affine))
    aggregator.add({"image": MetaTensor(torch.zeros(1, 8, 8), meta={"filename_or_obj": "x.png"})})  # ends it
    aggregator.complete()
    heat, label = nib.load(tmp_path / "scan_heatmap.nii.gz"), nib.load(tmp_path / "scan_label.nii.gz")
    assert heat.shape == label.shape == (10, 24, 16) and np.allclose(heat.affine, affine)
    h, lab = heat.get_fdata(), label.get_fdata()
    assert [round(h[k].max(), 4) for k in range(10)] == [0, 0, 0, 0.3, 0.4, 0, 0.6, 0, 0, 0]
    assert h[4, 12, 8] == pytest.approx(0.4) and h[4, 0, 0] == 0  # the centre of the (24, 16) plane
    assert [int(lab[k].any()) for k in range(10)] == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]  # smoothed heat above 0.3
    rows = list(csv.DictReader(open(tmp_path / "volumes.csv")))
    assert len(rows) == 1 and list(rows[0]) == list(VOLUME_COLUMNS)
    row = rows[0]
    assert (row["slice_axis"], row["slices"], row["slices_scored"], row["top_slice"]) == ("0", "10", "3", "4")
    assert (row["abnormal"], row["abnormal_slices"], row["in_domain_slices"]) == ("1", "1", "")
    assert float(row["volume_score"]) == float(row["top_slice_score"]) == pytest.approx(0.7)
    assert float(row["p_value_of_top_slice"]) == pytest.approx(0.15)
    assert float(row["volume_p_value"]) == pytest.approx(0.45) == volume_p_value([0.4, 0.15, 0.3])
    assert volume_p_value([0.5, 0.6]) == 1.0
    # with alpha the decision is volume_p_value <= alpha: 0.45 > 0.2, normal although its top slice is abnormal
    with_alpha = VolumeAggregator(str(tmp_path / "alpha"), threshold=0.5, alpha=0.2)
    for k, score in scores.items():
        with_alpha.add(_slice_item(k, score, affine))
    with_alpha.complete()
    assert next(csv.DictReader(open(tmp_path / "alpha" / "volumes.csv")))["abnormal"] == "0"
    assert not nib.load(tmp_path / "alpha" / "scan_label.nii.gz").get_fdata().any()  # no pixel_threshold: empty


@pytest.fixture(scope="module")
def inferred(tmp_path_factory):
    """``run inferring --slice_axis 2`` with the shipped model on a folder of the volume and a 2D PNG, and on the
    PNG alone."""
    from bundle.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("volumes")
    sizes = {"train": (0, 0), "unlabeled": (0, 0), "val": (0, 0), "test": (1, 0)}
    demo = os.path.join(make_demo_dataset(str(root / "demo"), sizes=sizes), "images")
    inputs, flat = root / "inputs", root / "flat"
    inputs.mkdir(), flat.mkdir()
    png = sorted(os.listdir(demo))[0]
    shutil.copy(os.path.join(demo, png), inputs / "chest.png")
    shutil.copy(os.path.join(demo, png), flat / "chest.png")
    volume = make_volume(inputs / "head.nii.gz")
    log = run_inferring(inputs, root / "out", "--slice_axis", "2")
    run_inferring(flat, root / "flat_out")
    return root, volume, log


def test_inferring_scores_every_slice_with_foreground_and_writes_the_volume(inferred):
    root, volume, log = inferred
    out = root / "out"
    rows = list(csv.reader(open(out / "scores.csv")))
    volume_path = str(root / "inputs" / "head.nii.gz")
    scored = [k for k in range(SHAPE[2]) if k not in EMPTY_SLICES + (CAP_SLICE,)]
    slice_rows = {r[0]: float(r[1]) for r in rows if r[0].startswith(volume_path)}
    assert list(slice_rows) == [slice_row_name(volume_path, k) for k in scored]  # empty slices and the cap: none
    assert [os.path.basename(r[0]) for r in rows if not r[0].startswith(volume_path)] == ["chest.png"]
    assert len({len(r) for r in rows}) == 1  # the same columns for slices and 2D images
    # no per-slice 2D heat maps: the 3D ones
    assert sorted(os.listdir(out)) == [
        "chest_heatmap.png", "head_heatmap.nii.gz", "head_label.nii.gz", "scores.csv", "volumes.csv"
    ]  # fmt: skip

    table = list(csv.DictReader(open(out / "volumes.csv")))
    assert len(table) == 1 and list(table[0]) == list(VOLUME_COLUMNS)
    row = table[0]
    top_row = max(slice_rows, key=slice_rows.get)
    assert row["file"] == volume_path and int(row["slices"]) == 12 and int(row["slices_scored"]) == len(scored)
    assert top_row == slice_row_name(volume_path, LESION_SLICE) and int(row["top_slice"]) == LESION_SLICE
    assert float(row["volume_score"]) == pytest.approx(max(slice_rows.values()))
    assert float(row["volume_p_value"]) == pytest.approx(min(1.0, len(scored) * float(row["p_value_of_top_slice"])))
    assert f"at slice {LESION_SLICE}" in log and "head.nii.gz: 8 of 12 slices along axis 2 scored" in log

    heat, label = nib.load(out / "head_heatmap.nii.gz"), nib.load(out / "head_label.nii.gz")
    source = nib.load(root / "inputs" / "head.nii.gz")
    for image in (heat, label):
        assert image.shape == source.shape == SHAPE and np.allclose(image.affine, source.affine)
    h, lab = heat.get_fdata(), label.get_fdata()
    assert not h[..., list(EMPTY_SLICES) + [CAP_SLICE]].any() and not lab[..., list(EMPTY_SLICES) + [CAP_SLICE]].any()
    assert all(h[..., k].max() > 0 for k in scored)
    assert np.unravel_index(h.argmax(), h.shape)[2] == LESION_SLICE
    # the lesion raises the heat where it is: on its slice, inside the disc, well above the same place elsewhere
    disc = lesion_disc()
    inside = {k: h[..., k][disc].mean() for k in scored}
    assert inside[LESION_SLICE] > 1.3 * max(v for k, v in inside.items() if k != LESION_SLICE)
    labelled = {k: lab[..., k][disc].mean() for k in scored}
    assert labelled[LESION_SLICE] > max(v for k, v in labelled.items() if k != LESION_SLICE)
    assert set(np.unique(lab)) <= {0.0, 1.0} and label.get_data_dtype() == np.uint8


def test_2d_inputs_keep_their_rows_and_outputs(inferred):
    root, _, _ = inferred
    alone = list(csv.reader(open(root / "flat_out" / "scores.csv")))
    beside_a_volume = [r for r in csv.reader(open(root / "out" / "scores.csv")) if r[0].endswith("chest.png")]
    assert len(alone) == 1 and alone[0][0] == str(root / "flat" / "chest.png")
    assert np.allclose([float(v) for v in alone[0][1:]], [float(v) for v in beside_a_volume[0][1:]], rtol=1e-5)
    assert sorted(os.listdir(root / "flat_out")) == ["chest_heatmap.png", "scores.csv"]  # no volumes.csv


def test_threshold_calibration_takes_every_scored_slice_of_a_normal_volume(tmp_path):
    """scripts/calibrate_threshold.py given a volume (e.g. a site's normal scans): its scores are the slice rows of
    inference (the threshold is on slice scores), not a missing row named by the file."""
    import importlib.util

    from bundle.pretrained import pretrained_model_path

    spec = importlib.util.spec_from_file_location("calibrate", os.path.join(ROOT, "scripts", "calibrate_threshold.py"))
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    volume = str(tmp_path / "normal.nii.gz")
    scored = foreground_slices(make_volume(volume), 2)
    scores = calibrate.anomaly_scores(pretrained_model_path(), [volume])
    assert len(scores) == len(scored) > 1 and np.all(np.isfinite(scores))
