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
    """Demo images: 10 normal training images, 3 abnormal val images, 6 unlabeled (3 normal, 3 abnormal)."""
    root = tmp_path_factory.mktemp("train_studies")
    names = sorted(os.listdir(demo_images))
    chosen = [n for n in names if n.startswith("train_0")][:10] + [n for n in names if n.startswith("val_1")][:3]
    chosen += [n for n in names if n.startswith("unlabeled_0")][:3] + [n for n in names if n.startswith("unlabeled_1")][
        :3
    ]
    for n in chosen:
        shutil.copy(os.path.join(demo_images, n), root / n)
    return str(root)


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

        start = time.time()
        r = client.post("/train/sagan", json={})  # background, as a client (Slicer) starts it
        assert r.status_code == 200, r.text
        while True:
            task = client.get("/train/").json()
            if task["status"] not in ("SUBMITTED", "RUNNING"):
                break
            assert time.time() - start < 300, task
            time.sleep(1)
        assert task["status"] == "DONE", "\n".join(task.get("details", []))
        stats = client.get("/info/").json()["train_stats"]["sagan"]
        assert stats["published"] is True
        assert stats["sets"] == {"normal": 7, "unlabeled": 6, "val_normal": 3, "val_abnormal": 3, "skipped": 0}
        assert stats["val_auc"] > stats["served_val_auc"]
        assert _digest(served) != before_digest  # published in place, atomically
        assert infer(client, images[0])[1]["anomaly_score"] != pytest.approx(score_before, abs=1e-6)
    assert snapshot(bundle_copy) == before, "training wrote into the bundle folder"
    assert not [n for n in os.listdir(model_dir) if n.startswith(".model-")], "a temporary model file was left"
