"""3D volumes in training and evaluation (issue 23, part 2): a Med-AD set of NIfTI volumes is taken as the
foreground slices of each volume (the rule inference uses), each slice with its volume's label, the splits stay
volume-disjoint, validation reports a slice-level AUC, and ``run evaluating`` reports slice- and volume-level AUC/AP
(volume score = its top slice score) with one scores.csv row per slice and a volumes.csv; 2D sets are unchanged."""

import csv
import json
import logging
import os
import pickle
from collections import defaultdict
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.data import ImageCache, image_items, labelled_items, load_medad_datalist
from bundle.handlers import EvaluationReportHandler, VolumeLevelMetrics
from bundle.handlers.evaluation_report import volume_cases
from bundle.selection import training_sets
from bundle.settings import load_model_settings
from bundle.transforms import LoadGrayscaleImaged, io
from bundle.transforms.io import BadImageError
from bundle.volumes import VolumeSlices, foreground_slices

from .conftest import ROOT
from .test_bundle_e2e import bundle_run

SHAPE = (32, 32, 16)  # slices along the last axis, 32 x 32 each
LESION_SLICES = (6, 7, 8)
# how many volumes each list of data.json holds, and their label
LISTS = {
    "train/0": (4, 0),
    "train/unlabeled/0": (2, 0),
    "train/unlabeled/1": (2, 1),
    "val/0": (2, 0),
    "val/1": (2, 1),
    "test/0": (3, 0),
    "test/1": (3, 1),
}
TINY = ["--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4"]
TRAIN = ["--config_file", "configs/train.json"]
EVAL = ["--config_file", "['configs/train.json','configs/evaluate.json']"]


def tissue_slices(seed: int) -> list[int]:
    """The slices of volume ``seed`` that hold tissue (the others are empty): 1-2 .. 12-14, varying per volume."""
    return list(range(1 + seed % 2, 15 - seed % 3))


def make_volume(path: str, seed: int, abnormal: bool) -> None:
    """A (32, 32, 16) float32 NIfTI: zeros, a smooth ellipse (with a little noise) on :func:`tissue_slices`, and,
    when ``abnormal``, a bright disc on :data:`LESION_SLICES`."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    volume = np.zeros(SHAPE, np.float32)
    r = ((x - 16) / 11) ** 2 + ((y - 16) / 9) ** 2
    for k in tissue_slices(seed):
        volume[..., k] = np.clip(1 - r, 0, None) * 300 + 100 * (r < 1)
    volume += np.random.default_rng(seed).normal(0, 2, SHAPE).astype(np.float32) * (volume > 0)
    if abnormal:
        disc = (x - 12) ** 2 + (y - 18) ** 2 < 16
        for k in LESION_SLICES:
            volume[..., k][disc] = 1200
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), path)


def make_volume_dataset(root: str) -> dict[str, tuple[int, list[int]]]:
    """A Med-AD set of volumes under ``root``; returns {image path: (label, slices with tissue)}."""
    os.makedirs(os.path.join(root, "images"))
    names: dict[str, list[str]] = {}
    expected = {}
    seed = 0
    for key, (n, label) in LISTS.items():
        names[key] = []
        for i in range(n):
            name = f"{key.replace('/', '_')}_{i}.nii.gz"
            make_volume(os.path.join(root, "images", name), seed, bool(label))
            expected[os.path.join(root, "images", name)] = (label, tissue_slices(seed))
            names[key].append(name)
            seed += 1
    data = {
        "train": {
            "0": names["train/0"],
            "unlabeled": {"0": names["train/unlabeled/0"], "1": names["train/unlabeled/1"]},
        },
        "val": {"0": names["val/0"], "1": names["val/1"]},
        "test": {"0": names["test/0"], "1": names["test/1"]},
    }
    with open(os.path.join(root, "data.json"), "w") as f:
        json.dump(data, f)
    return expected


def preprocessing():
    """The bundle's preprocessing as train.json builds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    return parser.get_parsed_content("preprocessing")


def auc(scores, labels) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


@pytest.fixture(scope="module")
def volume_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("volumes"))
    return root, make_volume_dataset(root)


def test_each_volume_becomes_its_foreground_slices_with_its_label(volume_set, monkeypatch, caplog):
    root, expected = volume_set
    datalist = load_medad_datalist(root)
    reads = []
    original = io._read_checked
    monkeypatch.setattr(io, "_read_checked", lambda f, loader: reads.append(f) or original(f, loader))
    with caplog.at_level(logging.INFO, logger="bundle.data"):
        test = ImageCache(labelled_items(datalist, "test"), preprocessing(), name="test images")
    assert len(reads) == 6 and len(set(reads)) == 6  # each volume decoded once, not once per slice
    assert "decoded 75 test images (75 foreground slices of 6 volumes along axis 2)" in caplog.text
    per_volume = defaultdict(list)
    for i, item in enumerate(test.items):
        label, slices = expected[item["image"]]
        assert item["label"] == label and item["filename"] == f"{item['image']}#slice={item['slice_index']}"
        assert item["slice_axis"] == 2
        per_volume[item["image"]].append(item["slice_index"])
        decoded = test[i]
        assert decoded["label"] == label and decoded["filename"] == item["filename"]
        assert decoded["image"].shape == (1, 64, 64) and -1 <= decoded["image"].min() <= decoded["image"].max() <= 1
    for volume, slices in per_volume.items():  # the foreground rule: exactly the slices with tissue, in order
        assert slices == expected[volume][1] == foreground_slices(nib.load(volume).get_fdata(), -1)
        assert test.volumes[volume] == VolumeSlices(volume, SHAPE, 2, tuple(slices))
    assert len(per_volume) == 6 and set(test.slice_rows.values()) == {
        (v, k) for v, ks in per_volume.items() for k in ks
    }
    copy = pickle.loads(pickle.dumps(test))  # DataLoader workers started by spawn
    assert len(copy) == len(test) and copy.slice_rows == test.slice_rows
    # a slice along the last axis is the image the model's own slice_index gives
    k = expected[test.items[0]["image"]][1][0]
    alone = preprocessing()({"image": test.items[0]["image"], "slice_index": k})["image"]
    assert torch.equal(torch.as_tensor(test[0]["image"]), torch.as_tensor(alone))


def test_splits_stay_volume_disjoint(volume_set):
    root, expected = volume_set
    datalist = load_medad_datalist(root)
    sets = training_sets(datalist, checkpoint_selection="pseudo_auc", holdout_fraction=0.25, holdout_min=1, seed=3)
    transform = preprocessing()
    caches = {
        "normal": ImageCache(image_items(sets.normal), transform),
        "unlabeled": ImageCache(image_items(sets.unlabeled), transform),
        "held": ImageCache(image_items(sets.held_normal + sets.held_unlabeled), transform),
        "val": ImageCache(labelled_items(datalist, "val"), transform),
        "test": ImageCache(labelled_items(datalist, "test"), transform),
    }
    owner = {}
    for name, cache in caches.items():
        volumes = {item["image"] for item in cache.items}
        assert len(cache) == sum(len(expected[v][1]) for v in volumes)  # every foreground slice of each volume
        for volume in volumes:
            assert owner.setdefault(volume, name) == name, f"{volume} in {owner[volume]} and {name}"
    assert len(owner) == len(expected)


def test_2d_items_pass_unchanged_and_a_fixed_slice_index_is_kept(volume_set, tiny_dataset):
    root, expected = volume_set
    datalist = load_medad_datalist(tiny_dataset)
    items = labelled_items(datalist, "val")
    cache = ImageCache(items, preprocessing())
    assert cache.items == items and cache.volumes == {} and cache.slice_rows == {}
    volume = next(iter(expected))
    fixed = ImageCache([{"image": volume}] * 2, LoadGrayscaleImaged("image", slice_index=5))
    assert len(fixed) == 2 and fixed.volumes == {} and fixed[0]["image"].shape == (1, 32, 32)
    with pytest.raises(BadImageError, match="is a 3D volume"):  # slicing off: refused, as before
        ImageCache([{"image": volume}], LoadGrayscaleImaged("image"), slice_axis=None)


def test_a_volume_without_foreground_is_skipped_by_name_and_a_4d_series_is_refused(volume_set, tmp_path, caplog):
    root, expected = volume_set
    empty, series = str(tmp_path / "empty.nii.gz"), str(tmp_path / "series.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), empty)
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 4, 3).astype(np.float32), np.eye(4)), series)
    volume = next(iter(expected))
    with caplog.at_level(logging.WARNING, logger="bundle.data"):
        cache = ImageCache(image_items([empty, volume]), preprocessing(), name="normal training images")
    assert f"{empty}: none of its 16 slices along axis 2 holds enough foreground" in caplog.text
    assert len(cache) == len(expected[volume][1]) and [s["file"] for s in cache.skipped] == [empty]
    with pytest.raises(BadImageError, match="series.nii.gz: is a 4D series of shape"):
        ImageCache(image_items([volume, series]), preprocessing())
    skipping = ImageCache(image_items([volume, series]), preprocessing(), on_bad_image="skip")
    assert [s["file"] for s in skipping.skipped] == [series] and "4D series" in skipping.skipped[0]["reason"]


def report(out, rows, slice_rows=None, volumes=None, threshold=0.45) -> dict:
    """EvaluationReportHandler's metrics.json for ``rows`` [(file, label, score)] of a data set with ``slice_rows``,
    written into ``out``."""
    handler = EvaluationReportHandler(out, threshold=threshold)
    handler.rows = list(rows)
    handler.images = [torch.zeros(1, 8, 8) for _ in rows]
    handler.restored = [torch.zeros(1, 8, 8) for _ in rows]
    dataset = SimpleNamespace(skipped=[], slice_rows=slice_rows or {}, volumes=volumes or {})
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"auc": 0.5}), data_loader=SimpleNamespace(dataset=dataset))
    handler._write(engine)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def test_volume_level_auc_takes_the_top_slice_of_each_volume(tmp_path):
    # by the top slice: abnormal {0.9, 0.45} vs normal {0.5, 0.4} -> AUC 3/4; by the mean slice it would be 1/4
    scores = {"a": (0, [0.5, 0.5, 0.5]), "b": (1, [0.9, 0.1, 0.1]), "c": (0, [0.4, 0.4]), "d": (1, [0.45, 0.45])}
    rows, slice_rows, volumes = [], {}, {}
    for volume, (label, slices) in scores.items():
        volumes[volume] = VolumeSlices(volume, (8, 8, 5), 2, tuple(range(1, 1 + len(slices))))
        for k, score in enumerate(slices, start=1):
            rows.append((f"{volume}#slice={k}", label, score))
            slice_rows[f"{volume}#slice={k}"] = (volume, k)
    metrics = report(tmp_path / "volumes", rows, slice_rows, volumes)
    assert metrics["volume_auc"] == pytest.approx(0.75) and metrics["n_volumes_abnormal"] == 2
    assert metrics["volume_sensitivity"] == 0.5 and metrics["volume_specificity"] == 0.5  # 0.5 > 0.45 flags "a"
    with open(tmp_path / "volumes" / "volumes.csv") as f:
        table = {r["file"]: r for r in csv.DictReader(f)}
    assert table["b"]["volume_score"] == "0.9" and table["b"]["top_slice"] == "1" and table["b"]["slices"] == "5"
    assert table["a"]["label"] == "0" and table["a"]["abnormal"] == "1" and table["b"]["abnormal_slices"] == "1"
    # 2D rows: no volume keys, no volumes.csv
    metrics = report(tmp_path / "images", [("x.png", 0, 0.1), ("y.png", 1, 0.9)])
    assert not any(k.startswith(("volume", "n_volumes")) for k in metrics)
    assert not os.path.exists(tmp_path / "images" / "volumes.csv")


def test_volume_level_validation_metrics_are_added_only_for_volumes():
    handler = VolumeLevelMetrics()
    rows = [("a#slice=1", 0, 0.5), ("a#slice=2", 0, 0.2), ("b#slice=1", 1, 0.3), ("b#slice=2", 1, 0.9)]
    rows += [("c#slice=4", 0, 0.35), ("d#slice=3", 1, 0.4)]  # by the top slice: AUC 3/4 (by the mean: 1)
    slice_rows = {row[0]: (row[0][0], int(row[0][-1])) for row in rows}
    for rows_seen, dataset in ((rows, SimpleNamespace(slice_rows=slice_rows)), (rows, SimpleNamespace())):
        engine = SimpleNamespace(state=SimpleNamespace(metrics={"val_auc": 0.5}), data_loader=SimpleNamespace())
        engine.data_loader.dataset = dataset
        engine.state.batch = [{"filename": f} for f, _, _ in rows_seen]
        engine.state.output = [{"label": torch.tensor(y), "score": torch.tensor([s])} for _, y, s in rows_seen]
        handler._reset(engine)
        handler._collect(engine)
        handler._compute(engine)
        if hasattr(dataset, "slice_rows"):
            assert engine.state.metrics["val_volume_auc"] == pytest.approx(0.75)
            assert 0 < engine.state.metrics["val_volume_ap"] <= 1
        else:  # a 2D data set: nothing added
            assert engine.state.metrics == {"val_auc": 0.5}
    assert volume_cases(rows, slice_rows) == {"a": (0, 0.5), "b": (1, 0.9), "c": (0, 0.35), "d": (1, 0.4)}
    with pytest.raises(ValueError, match="a: its slices carry the labels 0 and 1"):
        volume_cases(rows + [("a#slice=3", 1, 0.1)], {**slice_rows, "a#slice=3": ("a", 3)})


@pytest.fixture(scope="module")
def trained_on_volumes(volume_set, tmp_path_factory):
    root, expected = volume_set
    out = tmp_path_factory.mktemp("volume_run")
    common = ["--dataset_dir", root, "--ckpt_dir", str(out / "models"), "--bundle_root", str(out)]
    train_log = bundle_run(
        "training", *TRAIN, *common, "--output_dir", str(out / "tb"), *TINY, "--iterations", "10", "--val_interval", "5"
    )
    eval_log = bundle_run("evaluating", *EVAL, *common, "--eval_dir", str(out / "eval"))
    return out, expected, train_log, eval_log


def test_training_validates_on_volume_slices(trained_on_volumes):
    out, expected, log, _ = trained_on_volumes
    assert "decoded 51 normal training images (51 foreground slices of 4 volumes along axis 2)" in log
    assert "(49 foreground slices of 4 volumes along axis 2)" in log  # val
    assert log.count("val_auc") >= 2 and os.path.isfile(out / "models" / "model.pt")
    assert log.count("val_volume_auc") >= 2  # one score per val volume too, logged beside the slice-level key metric
    # the model records the axis, so that evaluation and inference slice its volumes the same way
    assert load_model_settings(str(out / "models" / "model.pt"))["slice_axis"] == -1


def test_evaluating_reports_slice_and_volume_level(trained_on_volumes):
    out, expected, _, log = trained_on_volumes
    metrics = json.load(open(out / "eval" / "metrics.json"))
    with open(out / "eval" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    per_volume = defaultdict(list)
    for row in rows:  # one row per slice, named as inference names it, with its volume's label
        volume, k = row["file"].rsplit("#slice=", 1)
        assert int(row["label"]) == expected[volume][0]
        per_volume[volume].append((int(k), float(row["score"])))
    test_volumes = {v for v in expected if "test_" in os.path.basename(v)}
    assert set(per_volume) == test_volumes
    for volume, slices in per_volume.items():
        assert [k for k, _ in slices] == expected[volume][1]
    # slice level: the evaluator's key metric over every slice
    labels = [int(r["label"]) for r in rows]
    assert metrics["auc"] == pytest.approx(auc([float(r["score"]) for r in rows], labels))
    assert metrics["n_normal"] + metrics["n_abnormal"] == len(rows) == 75
    # volume level: the top slice score per volume, by hand
    top = {v: max(s for _, s in slices) for v, slices in per_volume.items()}
    volume_labels = [expected[v][0] for v in top]
    assert metrics["volume_auc"] == pytest.approx(auc(list(top.values()), volume_labels))
    assert metrics["n_volumes_normal"] == 3 and metrics["n_volumes_abnormal"] == 3
    assert 0 <= metrics["volume_ap"] <= 1
    with open(out / "eval" / "volumes.csv") as f:
        table = {r["file"]: r for r in csv.DictReader(f)}
    assert set(table) == test_volumes
    for volume, row in table.items():
        assert float(row["volume_score"]) == pytest.approx(top[volume], abs=1e-7)
        assert int(row["slices_scored"]) == len(expected[volume][1]) and int(row["slices"]) == SHAPE[2]
        assert int(row["label"]) == expected[volume][0]
    assert f"volume_auc {metrics['volume_auc']:.4f}" in log and "volume level: 6 volumes" in log


@pytest.mark.parametrize("config_files", [["inference.json"], ["train.json", "evaluate.json"]])
def test_evaluation_and_inference_slice_along_the_models_axis(tmp_path, config_files):
    """The axis a model was trained along is recorded in it and read back by evaluation and inference; models of
    0.10 and before record none and get the last axis."""
    from monai.bundle import ConfigParser

    from bundle.networks import SAGANGenerator
    from bundle.settings import DEFAULT_SETTINGS, model_file_contents

    net = SAGANGenerator(**{k: v for k, v in DEFAULT_SETTINGS["network_def"].items() if k != "_target_"})
    for recorded, expected in ((0, 0), (None, -1)):
        settings = {"network_def": DEFAULT_SETTINGS["network_def"], "image_size": 64, "threshold": 0.1}
        if recorded is not None:
            settings["slice_axis"] = recorded
        path = tmp_path / f"model_{recorded}.pt"
        torch.save(model_file_contents(net.state_dict(), settings), path)
        parser = ConfigParser()
        parser.read_config([os.path.join(ROOT, "configs", name) for name in config_files])
        parser["model_path"] = str(path)
        assert parser.get_parsed_content("slice_axis") == expected
