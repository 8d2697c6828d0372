# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The app's parts in-process (no bundle training): the normal/abnormal convention, the training split and its
refusals, the Med-AD folder, the publish-if-better rule, DICOM series in the datastore."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from monailabel.interfaces.exception import MONAILabelException
from PIL import Image

from bundle.data import load_medad_datalist

from .helpers import ROOT, app_client, bad_model, write_series


def _save_label(datastore, image_id: str, array: np.ndarray, tmp_path) -> None:
    path = tmp_path / f"{image_id}_label.png"
    Image.fromarray(array).save(path)
    datastore.save_label(image_id, str(path), "final", {})


@pytest.fixture()
def datastore(demo_images, tmp_path):
    """13 demo images and one DICOM series: 5 normal by info tag, 1 normal by an empty final label, 1 abnormal by
    a final label with a region, 1 abnormal by info tag, 1 tagged normal but with a region (the tag wins),
    4 unlabeled."""
    from lib.datastore import SAGANDatastore

    root = tmp_path / "studies"
    root.mkdir()
    available = sorted(os.listdir(demo_images))

    def pick(prefix: str, start: int, stop: int) -> list[str]:
        return [n for n in available if n.startswith(prefix)][start:stop]

    names = pick("train_0", 0, 6) + pick("val_1", 0, 2) + pick("train_0", 6, 7)
    names += pick("unlabeled_0", 0, 2) + pick("unlabeled_1", 0, 2)
    for n in names:
        shutil.copy(os.path.join(demo_images, n), root / n)
    write_series(str(root / "series"), [np.full((8, 8), 100, np.uint16)] * 2)
    store = SAGANDatastore(str(root), extensions=["*.png"], auto_reload=False)
    ids = [os.path.splitext(n)[0] for n in names]
    empty = np.zeros((96, 96), np.uint8)
    region = empty.copy()
    region[10:20, 10:20] = 1
    for i in ids[:5]:
        store.update_image_info(i, {"sagan": "normal"})
    _save_label(store, ids[5], empty, tmp_path)
    _save_label(store, ids[6], region, tmp_path)
    store.update_image_info(ids[7], {"sagan": "Abnormal"})
    store.update_image_info(ids[8], {"sagan": "normal"})
    _save_label(store, ids[8], region, tmp_path)
    return store, ids


def test_image_class_convention(datastore):
    from lib.datastore import image_class

    store, ids = datastore
    classes = [image_class(store, i) for i in ids]
    assert classes == ["normal"] * 6 + ["abnormal"] * 2 + ["normal"] + [None] * 4
    store.update_image_info(ids[0], {"sagan": "healthy"})
    with pytest.raises(ValueError, match=f"image {ids[0]}: info 'sagan' is 'healthy'"):
        image_class(store, ids[0])


def test_series_folders_are_images(datastore):
    store, ids = datastore
    assert "series" in store.list_images()
    assert os.path.isdir(store.get_image_uri("series"))
    assert "labels" not in store.list_images()


def test_split(datastore, tmp_path):
    from lib.trainers.sagan import split_datastore, write_medad

    store, ids = datastore
    path = {i: store.get_image_uri(i) for i in ids}
    split = split_datastore(store, min_normal=4, val_fraction=0.3, seed=0)
    normal = {path[i] for i in ids[:6] + [ids[8]]}
    assert len(split.val["0"]) == 2 and len(split.normal) == 5  # round(0.3 * 7) held out
    assert set(split.val["0"]) | set(split.normal) == normal and not set(split.val["0"]) & set(split.normal)
    assert set(split.val["1"]) == {path[ids[6]], path[ids[7]]}
    assert set(split.unlabeled) == {path[i] for i in ids[9:]}
    assert list(split.skipped) == ["series"] and "DICOM series folder" in split.skipped["series"]
    assert split_datastore(store, 4, 0.3, seed=0) == split  # deterministic
    root = write_medad(split, str(tmp_path / "medad"))
    datalist = load_medad_datalist(root)  # the bundle's own reader accepts it
    assert len(datalist.normal) == 5 and len(datalist.unlabeled_normal) == 4 and not datalist.unlabeled_abnormal
    assert {k: len(v) for k, v in datalist.val.items()} in ({"0": 2, "1": 2}, {0: 2, 1: 2})
    assert all(os.path.realpath(f) in normal for f in datalist.normal)


def test_split_refusals(datastore):
    from lib.trainers.sagan import split_datastore

    store, ids = datastore
    with pytest.raises(MONAILabelException, match="at least 8 known-normal images.*has 7"):
        split_datastore(store, min_normal=8, val_fraction=0.2)
    for i in (ids[6], ids[7]):
        store.update_image_info(i, {"sagan": "normal"})
    with pytest.raises(MONAILabelException, match="at least one known-abnormal image"):
        split_datastore(store, min_normal=4, val_fraction=0.2)


def test_split_skips_what_training_cannot_read(datastore, tmp_path):
    """A 3D NIfTI (no slice rule) and a corrupt PNG in the datastore: left out of every set with the bundle's reason,
    instead of reaching the bundle's training, which refuses them."""
    import nibabel as nib
    from lib.datastore import SAGANDatastore
    from lib.trainers.sagan import split_datastore, trainable_reason

    store, ids = datastore
    root = os.path.dirname(store.get_image_uri(ids[0]))
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 5)).astype(np.float32), np.eye(4)),
        f"{root}/vol.nii.gz",
    )
    with open(os.path.join(root, "zz_broken.png"), "wb") as f:
        f.write(b"not a png")
    store = SAGANDatastore(root, extensions=["*.png", "*.nii.gz"], auto_reload=False)
    path = {i: store.get_image_uri(i) for i in store.list_images()}
    unchecked = split_datastore(store, 4, 0.3)
    assert {path["vol"], path["zz_broken"]} <= set(unchecked.unlabeled)  # what the bundle's training then refused
    split = split_datastore(store, 4, 0.3, check=trainable_reason)
    assert set(split.skipped) == {"series", "vol", "zz_broken"} and split.counts()["skipped"] == 3
    assert "3D volume" in split.skipped["vol"] and "slice_index" in split.skipped["vol"]
    assert "cannot read image" in split.skipped["zz_broken"]
    assert set(split.unlabeled) == {path[i] for i in ids[9:]}
    assert trainable_reason(path["vol"], slice_index=2) is None  # a slice rule makes the volume usable
    assert trainable_reason(path[ids[0]]) is None


def test_train_options_checked(tmp_path):
    """The options /info/ offers are checked before any training starts (the bundle's rule: iterations a
    positive multiple of val_interval, 50 in the cpu preset, 25 in the demo one)."""
    from lib.trainers.sagan import SAGANTrainTask

    task = SAGANTrainTask(ROOT, str(tmp_path / "model.pt"), lambda: None, {})
    cpu = json.load(open(os.path.join(ROOT, "configs", "presets", "cpu.json")))
    expected = {"iterations": cpu["iterations"], "val_interval": cpu["val_interval"], "slice_index": None}
    assert task.check_request({})["schedule"] == expected
    assert task.check_request({"iterations": "100", "seed": 3})["iterations"] == 100
    assert task.check_request({"preset": "demo", "iterations": 75})["schedule"]["val_interval"] == 25
    refused = [
        (
            {"iterations": 20},
            "iterations (20) must be a positive multiple of val_interval (50, from preset 'cpu'): use 50",
        ),
        ({"iterations": 120}, "use 150 or 100"),
        ({"iterations": -5}, "iterations must be an integer >= 0"),
        ({"iterations": "many"}, "iterations must be an integer >= 0"),
        ({"val_fraction": 1.0}, "val_fraction must be a number in (0, 1)"),
        ({"seed": 1.5}, "seed must be an integer >= 0"),
        ({"preset": "fast"}, "preset 'fast': no config file fast"),
    ]
    for request, words in refused:
        with pytest.raises(MONAILabelException) as info:
            task.check_request(request)
        assert words in info.value.msg, (request, info.value.msg)
    with_overrides = SAGANTrainTask(
        ROOT, str(tmp_path / "model.pt"), lambda: None, {"train_overrides": "--val_interval 10"}
    )
    assert with_overrides.check_request({"iterations": 20})["schedule"]["val_interval"] == 10
    bad_conf = SAGANTrainTask(ROOT, str(tmp_path / "model.pt"), lambda: None, {"train_overrides": "--iterations 60"})
    with pytest.raises(MONAILabelException, match=r"\(60\).*with conf train_overrides\): use 100 or 50"):
        bad_conf.check_request({})


def test_training_refusal_over_rest(demo_images, tiny_model, bundle_copy, tmp_path):
    studies = tmp_path / "few"
    studies.mkdir()
    names = sorted(os.listdir(demo_images))[:3]
    for n in names:
        shutil.copy(os.path.join(demo_images, n), studies / n)
    conf = {"bundle": bundle_copy, "model_dir": str(tmp_path / "models"), "min_normal_images": "5"}
    with app_client(str(studies), conf) as client:
        assert "sagan" not in client.get("/info/").json()["models"]  # no model yet: infer task not listed
        for n in names:
            info = {"info": json.dumps({"sagan": "normal"})}
            assert client.put(f"/datastore/image/info?image={n[:-4]}", data=info).status_code == 200
        # options are checked when the request arrives, also for a background run: no task is started (MONAI Label
        # keeps its task list per process: tasks of earlier tests may be listed)
        tasks_before = client.get("/train/?all=true").json()
        for options, words in [({"iterations": 20}, "multiple of val_interval (50"), ({"preset": "x"}, "preset 'x'")]:
            response = client.post("/train/sagan", json=options)
            assert response.status_code == 422 and words in response.json()["detail"], response.text
        assert client.get("/train/?all=true").json() == tasks_before
        response = client.post("/train/sagan?run_sync=true", json={})
        assert response.status_code == 422
        assert "at least 5 known-normal images" in response.json()["detail"]
        assert not os.path.exists(tmp_path / "models" / "model.pt")
        os.makedirs(tmp_path / "models")
        shutil.copy(tiny_model, tmp_path / "models" / "model.pt")
        assert "sagan" in client.get("/info/").json()["models"]  # a model appeared: the task is created


@pytest.mark.parametrize(
    "served, new, publish, expected",
    [("black", "white", "better", False), ("white", "black", "better", True), ("black", "white", "always", True)],
)
def test_publish_only_a_better_model(datastore, tiny_model, tmp_path, served, new, publish, expected):
    """Black-out restores everything to -1 (score = brightness: abnormal demo images are brighter), white-out to
    +1 (the reverse order); the bundle's training is replaced by copying the "new" model."""
    from lib.trainers.sagan import SAGANTrainTask, split_datastore, val_auc

    store, _ = datastore
    models = {c: bad_model(tiny_model, str(tmp_path / f"{c}.pt"), v) for c, v in (("black", -1.0), ("white", 1.0))}
    val = split_datastore(store, 4, 0.3).val
    assert val_auc(ROOT, models["black"], val) > val_auc(ROOT, models["white"], val)
    published = tmp_path / "published" / "model.pt"
    published.parent.mkdir()
    shutil.copy(models[served], published)
    conf = {"min_normal_images": "4", "val_fraction": "0.3", "publish": publish, "train_preset": "demo"}
    task = SAGANTrainTask(ROOT, str(published), lambda: str(published), conf)
    commands = []

    def fake_training(cmd):
        commands.append(cmd)
        ckpt = cmd[cmd.index("--ckpt_dir") + 1]
        os.makedirs(ckpt)
        shutil.copy(models[new], os.path.join(ckpt, "model.pt"))

    task._run_training = fake_training
    stats = task({}, store)
    assert stats["published"] is expected
    assert open(published, "rb").read() == open(models[new if expected else served], "rb").read()
    assert task.stats() == stats
    cmd = commands[0]
    assert cmd[cmd.index("--config_file") + 1] == "['configs/train.json']"
    assert cmd[cmd.index("--anomaly_ratio") + 1] == "0" and cmd[cmd.index("--unlabeled_size") + 1] == "4"
    assert not os.path.exists(os.path.dirname(cmd[cmd.index("--dataset_dir") + 1])), "work folder left behind"


def test_failed_training_names_its_root_cause(tmp_path):
    """MONAI's config parser wraps the bundle's own error (e.g. a training set smaller than one batch) in a
    RuntimeError whose traceback pushes the cause out of the last lines: the message leads with the cause."""
    import sys

    from lib.trainers.sagan import SAGANTrainTask

    task = SAGANTrainTask(ROOT, str(tmp_path / "model.pt"), lambda: None, {"bundle_python": sys.executable})
    script = "print('ValueError: the training data loader yields no batch'); print('\\n'.join(['x'] * 30)); exit(1)"
    with pytest.raises(MONAILabelException, match=r"failed \(exit 1\): ValueError: the training data loader yields"):
        task._run_training([sys.executable, "-c", script])


def test_the_pretrained_model_is_served_last_and_only_when_its_hash_holds(tmp_path, caplog):
    """The app's model list starts with the shipped pretrained model (served when nothing else exists); a damaged
    copy is not served and says why; a bundle without pretrained/ serves none of it."""
    import main as app_main

    from bundle.pretrained import pretrained_manifest

    shipped = os.path.join(ROOT, "pretrained")
    assert app_main._pretrained_model(ROOT) == [os.path.join(shipped, pretrained_manifest(shipped)["file"])]
    assert app_main._pretrained_model(str(tmp_path)) == []
    damaged = tmp_path / "pretrained"
    shutil.copytree(shipped, damaged)
    (damaged / pretrained_manifest(shipped)["file"]).write_bytes(b"not the model")
    with caplog.at_level("ERROR"):
        assert app_main._pretrained_model(str(tmp_path)) == []
    assert "not serving the pretrained model" in caplog.text
