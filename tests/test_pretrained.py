"""The shipped pretrained model (``pretrained/``): the file is the one the manifest names (sha256), the configs fall
back to it when no model was trained locally and say so, the weights the network holds are the file's, and it scores
generated images; its recorded test metrics are those of the test split it names."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bundle.pretrained import (
    PRETRAINED_DIR,
    pretrained_manifest,
    pretrained_model_path,
    sha256_of,
    trained_or_pretrained,
)
from bundle.settings import generator_from_settings, read_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERMANY = os.path.join(ROOT, "..", "shared", "data", "kermany_pneumonia")


def test_the_file_is_the_one_the_manifest_names():
    manifest = pretrained_manifest()
    path = pretrained_model_path()
    assert os.path.basename(path) == manifest["file"] and sha256_of(path) == manifest["sha256"]
    assert os.path.getsize(path) == manifest["bytes"] < 10 * 1024 * 1024  # small enough for git
    state, settings = read_model(path)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {getattr(torch, manifest["dtype"])}
    assert settings["threshold"] == manifest["threshold"] and settings["iteration"] == manifest["iteration"]


def test_a_damaged_copy_is_refused(tmp_path):
    copy = tmp_path / "pretrained"
    shutil.copytree(PRETRAINED_DIR, copy)
    data = bytearray((copy / pretrained_manifest()["file"]).read_bytes())
    data[-100] ^= 0xFF
    (copy / pretrained_manifest()["file"]).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is not the shipped model's"):
        pretrained_model_path(str(copy))


def test_a_locally_trained_model_comes_first(tmp_path, caplog):
    local = tmp_path / "model.pt"
    with caplog.at_level(logging.INFO, logger="bundle.pretrained"):
        assert trained_or_pretrained(str(local)) == pretrained_model_path()
        assert "using the shipped pretrained model" in caplog.text
        local.write_bytes(b"x")
        assert trained_or_pretrained(str(local)) == str(local)
    assert trained_or_pretrained(str(tmp_path / "absent.pt"), str(tmp_path / "no_pretrained")) == str(
        tmp_path / "absent.pt"
    )


def test_inference_without_a_local_model_scores_with_the_pretrained_weights(tmp_path):
    """``run inferring`` from a bundle root without models/: the shipped model, named in the log, scores a handful
    of generated images; the network it built holds exactly the file's weights (float16 ones cast to float32)."""
    from monai.bundle import ConfigParser

    from bundle.demo import make_demo_dataset

    sizes = {"train": (0, 0), "unlabeled": (0, 0), "val": (0, 0), "test": (3, 3)}
    images = os.path.join(make_demo_dataset(str(tmp_path / "demo"), sizes=sizes), "images")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json"]
    cmd += ["--ckpt_dir", str(tmp_path / "no_models"), "--input_path", images, "--output_dir", str(out)]
    log = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "using the shipped pretrained model" in log.stdout + log.stderr
    rows = list(csv.reader(open(out / "scores.csv")))  # file, score, abnormal
    assert len(rows) == 6 and all(0.0 <= float(r[1]) <= 1.0 for r in rows)

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.config.update({"bundle_root": ROOT, "ckpt_dir": str(tmp_path / "no_models"), "device": "cpu"})
    network = parser.get_parsed_content("network_def")
    assert parser.get_parsed_content("model_path") == pretrained_model_path()
    state, settings = read_model(pretrained_model_path())
    network.load_state_dict(state)
    reference = generator_from_settings(settings)
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    for (name, mine), theirs in zip(network.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(mine.float(), theirs.float()), name


@pytest.mark.skipif(not os.path.isdir(KERMANY), reason="the chest X-ray set (../shared/data) is not here")
def test_the_recorded_test_metrics_are_the_models(tmp_path):
    """pretrained/metrics_test.json (the model card's and the export's figures) is what evaluating the shipped
    file on the chest set's test split gives."""
    recorded = json.load(open(os.path.join(PRETRAINED_DIR, "metrics_test.json")))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file"]
    cmd += ["['configs/train.json','configs/evaluate.json']", "--dataset_dir", KERMANY, "--model_path"]
    cmd += [os.path.relpath(pretrained_model_path(), ROOT), "--eval_dir", str(tmp_path), "--progress_bar", "False"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    fresh = json.load(open(tmp_path / "metrics.json"))
    assert fresh["split"] == recorded["split"] == "test"
    for key in ("auc", "ap", "sensitivity", "specificity", "n_normal", "n_abnormal"):
        assert fresh[key] == pytest.approx(recorded[key], abs=1e-6), key
