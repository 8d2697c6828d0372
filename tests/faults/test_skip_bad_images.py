# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""``on_bad_image="skip"`` drops and counts a bad image, never replaces it by another one: cached and uncached
data sets, an image that goes bad in the middle of a run, the evaluation report's ``n_skipped`` / ``skipped``."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import DataLoader
from PIL import Image

from bundle.data import ImageCache, SAGANTrainingDataset, SkippedImageError, labelled_items, load_medad_datalist
from bundle.networks import SAGANGenerator
from bundle.settings import network_def_of
from bundle.transforms import BadImageError, LoadGrayscaleImaged

from ..conftest import ROOT


def write_png(path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)


def spoil(path) -> None:
    with open(path, "wb") as f:
        f.write(b"not an image")


@pytest.fixture
def files(tmp_path):
    out = [str(tmp_path / f"img{i}.png") for i in range(6)]
    for i, f in enumerate(out):
        write_png(f, i)
    return out


def loaded_ids(item) -> float:
    return float(torch.as_tensor(item["image"]).sum())  # each random image has its own sum


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_bad_image_at_start_is_dropped_and_counted(files, cache, caplog):
    spoil(files[2])
    with caplog.at_level(logging.WARNING):
        ds = ImageCache([{"image": f} for f in files], LoadGrayscaleImaged("image"), cache=cache, on_bad_image="skip")
    assert len(ds) == 5 and [i["image"] for i in ds.items] == files[:2] + files[3:]
    assert [(s["file"], s["reason"][:17]) for s in ds.skipped] == [(files[2], "cannot read image")]
    assert any("img2.png" in r.getMessage() for r in caplog.records)
    sums = [loaded_ids(ds[i]) for i in range(len(ds))]
    assert len(set(sums)) == 5  # five different images, none twice


def test_uncached_image_going_bad_is_never_replaced(files):
    ds = ImageCache([{"image": f} for f in files], LoadGrayscaleImaged("image"), cache=False, on_bad_image="skip")
    assert len(ds) == 6 and ds.skipped == []
    before = [loaded_ids(ds[i]) for i in range(6)]
    spoil(files[4])
    with pytest.raises(SkippedImageError, match="img4.png: cannot read image"):
        ds[4]
    assert [loaded_ids(item) for item in ds.__getitems__([3, 4, 5])] == [before[3], before[5]]
    assert [s["file"] for s in ds.skipped] == [files[4]]  # recorded once, however often it is hit
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    seen = [loaded_ids({"image": x}) for batch in loader for x in batch["image"]]
    assert seen == before[:4] + before[5:]  # the batch of 4 lost one image; nothing was scored twice
    for f in files:
        spoil(f)
    with pytest.raises(BadImageError, match="all 2 images of a batch became unreadable"):
        ds.__getitems__([0, 1])


def test_error_mode_still_raises_uncached(files):
    ds = ImageCache([{"image": f} for f in files], LoadGrayscaleImaged("image"), cache=False)
    spoil(files[1])
    with pytest.raises(BadImageError, match="img1.png") as info:
        ds[1]
    assert not isinstance(info.value, SkippedImageError)


def test_training_pairs_draw_another_pair_and_count(files, caplog):
    normal = ImageCache([{"image": f} for f in files[:3]], LoadGrayscaleImaged("image"))
    unlabeled = ImageCache(
        [{"image": f} for f in files[3:]], LoadGrayscaleImaged("image"), cache=False, on_bad_image="skip"
    )
    pairs = SAGANTrainingDataset(normal, unlabeled)
    pairs.set_random_state(0)
    good = {loaded_ids(unlabeled[i]) for i in (0, 2)}
    spoil(files[4])  # unlabeled[1]
    with caplog.at_level(logging.WARNING):
        drawn = [loaded_ids({"image": pairs[1]["unlabeled"]}) for _ in range(5)]
    assert set(drawn) <= good and pairs.n_skipped >= 5  # a redraw may hit the bad pair again
    assert sum("img4.png" in r.getMessage() for r in caplog.records) == pairs.n_skipped


# ------------------------------------------------------------------ evaluation over the real configs


def tiny_model(path) -> None:
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1)
    settings = {"network_def": network_def_of(g), "image_size": 64, "slice_index": None, "threshold": 0.05}
    torch.save({"model": g.state_dict(), "settings": settings}, path)


def evaluate(dataset_dir, tmp_path, cache: bool, batch_size: int = 64, hook=None) -> dict:
    model = str(tmp_path / "model.pt")
    tiny_model(model)
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", n) for n in ("train.json", "evaluate.json")])
    parser.update(
        {
            "bundle_root": ROOT,
            "dataset_dir": dataset_dir,
            "model_path": model,
            "eval_dir": str(tmp_path / "eval"),
            "output_dir": str(tmp_path / "tb"),
            "cache_images": cache,
            "on_bad_image": "skip",
            "device": "cpu",
            "evaluate#dataloader#batch_size": batch_size,
        }
    )
    evaluator = parser.get_parsed_content("evaluate#evaluator")
    if hook is not None:
        hook(evaluator)
    evaluator.run()
    report = json.load(open(tmp_path / "eval" / "metrics.json"))
    report["rows"] = list(csv.DictReader(open(tmp_path / "eval" / "scores.csv")))
    report["auc_metric"] = evaluator.state.metrics["auc"]
    return report


def auc_of(rows) -> float:
    from monai.metrics import compute_roc_auc

    labels = torch.tensor([int(r["label"]) for r in rows])
    return float(compute_roc_auc(torch.tensor([float(r["score"]) for r in rows]), labels))


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_evaluation_reports_skipped_images(tiny_dataset, tmp_path, cache):
    test = load_medad_datalist(tiny_dataset).test
    spoil_at_start = test[0][1]
    copy = tmp_path / "set"  # the files are spoiled in place: work on a copy of the shared tiny set
    shutil.copytree(tiny_dataset, copy)
    at_start = os.path.join(copy, "images", os.path.basename(spoil_at_start))
    during = os.path.join(copy, "images", os.path.basename(test[1][3]))
    spoil(at_start)

    def spoil_later(evaluator):  # after the first batch of 4, an abnormal image goes bad (uncached: not yet read)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: spoil(during))

    report = evaluate(str(copy), tmp_path, cache, batch_size=4, hook=spoil_later)
    expected = [at_start] if cache else [at_start, during]
    assert report["n_skipped"] == len(expected)
    assert [s["file"] for s in report["skipped"]] == expected
    assert [s["label"] for s in report["skipped"]] == [0, 1][: len(expected)]
    assert all("cannot read image" in s["reason"] for s in report["skipped"])
    files = [r["file"] for r in report["rows"]]
    assert len(files) == len(set(files)) == 12 - len(expected)  # nothing scored twice
    assert not set(files) & set(expected)
    assert report["n_normal"] == 5 and report["n_abnormal"] == 6 - (len(expected) - 1)
    assert report["auc"] == pytest.approx(auc_of(report["rows"]), abs=1e-9)  # the metric saw the same images


def test_report_refuses_an_image_scored_twice(tiny_dataset, tmp_path):
    """A data set that hands a neighbour for a bad image (the old uncached behaviour) is caught by the report."""

    class Neighbour(ImageCache):
        def __getitem__(self, index):
            return super().__getitem__(index if index != 2 else 3)

    def swap_dataset(evaluator):
        ds = evaluator.data_loader.dataset
        evaluator.data_loader.dataset.__class__ = Neighbour
        assert len(ds) == 12

    with pytest.raises(ValueError, match="scored more often than they are listed"):
        evaluate(tiny_dataset, tmp_path, cache=False, hook=swap_dataset)
    assert len(labelled_items(load_medad_datalist(tiny_dataset), "test")) == 12
