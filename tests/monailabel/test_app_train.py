# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Training through the real MONAI Label server: labels and tags set over REST, ``POST /train/sagan`` run in the
background as MONAI Label runs it (a subprocess of the app, which runs the bundle's training in the bundle's .venv),
and the new model served by the next ``/infer/sagan`` request."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from .helpers import BUNDLE_PYTHON, TINY_TRAIN, app_client, bad_model, infer, snapshot


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def datastore(demo_images, tmp_path_factory) -> str:
    """Demo images: 10 normal training images, 3 abnormal val images, 6 unlabeled (3 normal, 3 abnormal); and two
    files the bundle cannot train on: a 3D NIfTI (no slice rule) and a corrupt PNG."""
    root = tmp_path_factory.mktemp("train_studies")
    names = sorted(os.listdir(demo_images))
    chosen = [n for n in names if n.startswith("train_0")][:10] + [n for n in names if n.startswith("val_1")][:3]
    chosen += [n for n in names if n.startswith("unlabeled_0")][:3] + [n for n in names if n.startswith("unlabeled_1")][
        :3
    ]
    for n in chosen:
        shutil.copy(os.path.join(demo_images, n), root / n)
    volume = np.random.default_rng(0).random((40, 40, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), root / "zz_volume.nii.gz")
    (root / "zz_broken.png").write_bytes(b"not a png")
    return str(root)


def _wait_for_training(client, limit: float = 300) -> dict:
    start = time.time()
    while True:
        task = client.get("/train/").json()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task
        assert time.time() - start < limit, task
        time.sleep(1)


def test_training_publishes_a_better_model(datastore, tiny_model, bundle_copy, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("published")
    served = bad_model(tiny_model, str(model_dir / "model.pt"), restore_to=1.0)  # restores everything to white
    before_digest = _digest(served)
    conf = {
        "bundle": bundle_copy,
        "bundle_python": BUNDLE_PYTHON,
        "model_dir": str(model_dir),
        "min_normal_images": "4",
        "val_fraction": "0.3",
        "train_preset": "demo",
        "train_overrides": TINY_TRAIN,
    }
    before = snapshot(bundle_copy)
    with app_client(datastore, conf) as client:
        images = sorted(os.path.splitext(n)[0] for n in os.listdir(datastore) if n.endswith(".png"))
        assert client.get("/info/").json()["trainers"]["sagan"]["config"]["preset"] == "demo"
        # the two conventions: the image info tag, and a submitted final label (empty = normal, a region = abnormal)
        for image in [i for i in images if i.startswith("train_0")][:9]:
            r = client.put(f"/datastore/image/info?image={image}", data={"info": json.dumps({"sagan": "normal"})})
            assert r.status_code == 200, r.text
        empty = np.zeros((96, 96), np.uint8)
        region = empty.copy()
        region[40:50, 20:30] = 1
        last_normal = [i for i in images if i.startswith("train_0")][9]
        for image, label in [(last_normal, empty)] + [(i, region) for i in images if i.startswith("val_1")]:
            r = client.put(
                f"/datastore/label?image={image}&tag=final", files={"label": ("label.png", _png(label), "image/png")}
            )
            assert r.status_code == 200, r.text
        score_before = infer(client, images[0])[1]["anomaly_score"]

        r = client.post("/train/sagan", json={})  # background, as a client (Slicer) starts it
        assert r.status_code == 200, r.text
        task = _wait_for_training(client)
        assert task["status"] == "DONE", "\n".join(task.get("details", []))
        stats = client.get("/info/").json()["train_stats"]["sagan"]
        assert stats["published"] is True
        assert stats["sets"] == {"normal": 7, "unlabeled": 6, "val_normal": 3, "val_abnormal": 3, "skipped": 2}
        assert set(stats["skipped"]) == {"zz_volume", "zz_broken"} and "3D volume" in stats["skipped"]["zz_volume"]
        assert any('"skipped": 2' in line for line in task["details"])  # the task's result, shown by GET /train/
        assert stats["val_auc"] > stats["served_val_auc"]
        assert _digest(served) != before_digest  # published in place, atomically
        assert infer(client, images[0])[1]["anomaly_score"] != pytest.approx(score_before, abs=1e-6)
    assert snapshot(bundle_copy) == before, "training wrote into the bundle folder"
    assert not [n for n in os.listdir(model_dir) if n.startswith(".model-")], "a temporary model file was left"


def test_failed_training_shows_its_cause_in_train_status(datastore, bundle_copy, tmp_path):
    """A background training whose bundle run fails: ``GET /train/`` ends with the root cause (the first exception
    line of the bundle's chained traceback), not with traceback lines. The bundle's python is replaced by a script
    that prints what MONAI's config parser prints when the bundle refuses an image, then exits with 1."""
    fake = tmp_path / "python"
    noise = "\n".join(f'  File "/x/monai/bundle/config_item.py", line {n}, in instantiate' for n in range(30))
    fake.write_text(
        "#!/bin/sh\ncat <<'EOF'\nTraceback (most recent call last):\n"
        "bundle.transforms.io.BadImageError: /data/vol.nii.gz: is a 3D volume (shape (40, 40, 6)); choose a slice\n\n"
        "The above exception was the direct cause of the following exception:\n\nTraceback (most recent call last):\n"
        f"{noise}\nRuntimeError: Failed to instantiate component 'bundle.data.ImageCache' with keywords: items\n"
        "EOF\nexit 1\n"
    )
    fake.chmod(0o755)
    conf = {
        "bundle": bundle_copy,
        "bundle_python": str(fake),
        "model_dir": str(tmp_path / "models"),
        "min_normal_images": "4",
        "train_preset": "demo",
    }
    with app_client(datastore, conf) as client:
        images = sorted(os.path.splitext(n)[0] for n in os.listdir(datastore) if n.endswith(".png"))
        tags = [(i, "normal") for i in images if i.startswith("train_0")] + [(images[-2], "abnormal")]
        for image, tag in tags:
            r = client.put(f"/datastore/image/info?image={image}", data={"info": json.dumps({"sagan": tag})})
            assert r.status_code == 200, r.text
        assert client.post("/train/sagan", json={}).status_code == 200
        task = _wait_for_training(client, limit=120)
    assert task["status"] == "ERROR"
    last = task["details"][-1]
    assert "SAGAN training failed: the bundle's training failed (exit 1): " in last, task["details"]
    assert last.endswith(
        "bundle.transforms.io.BadImageError: /data/vol.nii.gz: is a 3D volume (shape (40, 40, 6)); choose a slice"
    )
