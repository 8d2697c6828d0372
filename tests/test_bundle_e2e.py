"""`python -m monai.bundle run` training -> evaluating -> inferring (and resuming) on a tiny generated set."""

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle.conformal import conformal_p_value
from bundle.settings import read_model

from .conftest import ROOT

TINY_NET = ["--conv_dim", "4", "--num_res_blocks", "1"]
TRAIN = ["--config_file", "configs/train.json"]
EVAL = ["--config_file", "['configs/train.json','configs/evaluate.json']"]
INFER = ["--config_file", "configs/inference.json"]


def bundle_run(run_id, *args):
    """``python -m monai.bundle run [run_id] ...`` from the bundle root (``run_id`` None: MONAI's default)."""
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert " - ERROR - " not in log, log[-4000:]
    return log


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    common = [
        "--dataset_dir",
        tiny_dataset,
        "--ckpt_dir",
        str(out / "models"),
        "--output_dir",
        str(out / "tb"),
        "--d_conv_dim",
        "4",
        "--batch_size",
        "4",
        "--val_interval",
        "2",
        "--image_log_interval",
        "2",
        "--log_interval",
        "1",
        "--tensorboard_interval",
        "1",
        *TINY_NET,
    ]
    log = bundle_run("training", *TRAIN, *common, "--iterations", "4")
    return out, common, log


def test_training_writes_checkpoints_and_tensorboard(trained):
    out, _, log = trained
    assert "val_auc" in log and "g_restoration" in log
    files = sorted(os.listdir(out / "models"))
    assert "model.pt" in files and "checkpoint_final.pt" in files and "checkpoint_epoch=2.pt" in files
    full = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert set(full) >= {"generator", "discriminator", "g_optimizer", "d_optimizer", "trainer"}
    assert full["trainer"]["iteration"] == 4
    state, settings = read_model(str(out / "models" / "model.pt"))
    plain = torch.load(out / "models" / "model.pt", weights_only=True)
    assert "stem.conv.weight" in plain and all(torch.is_tensor(v) for v in plain.values())  # a plain state dict
    assert settings["critic_stalls"] == [] and settings["critic_stall_iterations"] == 0  # 4 iterations: no stall
    assert settings["selected_by"] == "val_auc" and settings["iteration"] in (2, 4)
    assert settings["network_def"] == {
        "_target_": "bundle.networks.SAGANGenerator",
        "in_channels": 1,
        "conv_dim": 4,
        "num_res_blocks": 1,
        "patches_per_side": 2,
        "position_code": True,
        "attention_gates": True,
        "keep_prob": 0.95,
    }
    assert settings["image_size"] == 64 and settings["specificity"] == 0.95
    assert 0 < settings["threshold"] < 1 and settings["pixel_threshold"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"g_loss", "g_adv", "g_identity", "g_restoration", "d_loss", "gp", "val_auc", "val_ap"} <= set(
        tags["scalars"]
    )
    assert "restoration" in tags["images"]


def test_resume_continues(trained):
    out, common, _ = trained
    log = bundle_run("training", *TRAIN, *common, "--iterations", "6", "--resume", "True")
    assert "Restored all variables from" in log and "resumed at iteration 4: random states restored" in log
    assert torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)["trainer"]["iteration"] == 6


def test_evaluating_writes_report(trained, tiny_dataset):
    out, _, _ = trained
    log = bundle_run(
        "evaluating",
        *EVAL,
        "--dataset_dir",
        tiny_dataset,
        "--ckpt_dir",
        str(out / "models"),
        "--eval_dir",
        str(out / "eval"),
    )
    assert "RESULT auc" in log
    metrics = json.load(open(out / "eval" / "metrics.json"))
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["ap"] <= 1
    settings = read_model(str(out / "models" / "model.pt"))[1]
    assert metrics["threshold"] == settings["threshold"]
    assert metrics["critic_stalls"] == settings["critic_stalls"]
    low, high = metrics["specificity_interval"]  # where the specificity should lie on this many normals
    assert settings["threshold_normals"] > 0 and 0 <= low <= high <= 1
    scores = {
        r["file"]: (int(r["label"]), float(r["score"])) for r in csv.DictReader(open(out / "eval" / "scores.csv"))
    }
    called = [(label, score > settings["threshold"]) for label, score in scores.values()]
    assert metrics["sensitivity"] == pytest.approx(np.mean([c for label, c in called if label == 1]))
    assert metrics["specificity"] == pytest.approx(np.mean([not c for label, c in called if label == 0]))
    assert metrics["n_normal"] == 6 and metrics["n_abnormal"] == 6 and metrics["split"] == "test"
    rows = list(csv.DictReader(open(out / "eval" / "scores.csv")))
    assert len(rows) == 12 and all(0 <= float(r["score"]) <= 1 for r in rows)
    # the in-domain check fitted on the training images (12 normal + 12 unlabeled) and stored with the model
    assert settings["domain"]["n_fit"] == 24
    outside = [r for r in rows if r["in_domain"] == "0"]
    assert metrics["out_of_domain"]["n"] == len(outside) <= 1  # test images of the training domain
    # conformal p-values among the stored normal val scores, and the false-positive rates they give on the normals
    p_values = np.array([float(r["p_value"]) for r in rows])
    expected = conformal_p_value(np.array([float(r["score"]) for r in rows]), settings["normal_scores"])
    np.testing.assert_allclose(p_values, expected, rtol=1e-6)
    normal = np.array([r["label"] == "0" for r in rows])
    for level in metrics["conformal"]:
        assert level["false_positive_rate"] == pytest.approx(np.mean(p_values[normal] <= level["alpha"]))
        low, high = level["false_positive_rate_interval"]
        assert 0 <= low <= level["false_positive_rate"] <= high <= 1
    for name in ("roc.png", "pr.png", "extremes.png"):
        assert os.path.getsize(out / "eval" / name) > 1000


def test_inferring_mixed_formats(trained, tiny_dataset, tmp_path):
    from .dicom_files import make_dicom
    from .test_io import ramp

    out, _, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(os.path.join(tiny_dataset, "images", "test_1_0000.png"), inputs / "chest.png")
    nib.save(
        nib.Nifti1Image(np.random.rand(80, 72).astype(np.float32), np.diag([0.5, 0.5, 1, 1])), inputs / "scan.nii.gz"
    )
    make_dicom(inputs / "xray.dcm", ramp(64, 48), photometric="MONOCHROME1")
    # a one-slice volume (X, Y, 1) in the same batch as 2D images: metadata of other shapes (collate_mixed_meta)
    nib.save(nib.Nifti1Image(np.random.rand(70, 60, 1).astype(np.float32), np.eye(4)), inputs / "slab.nii.gz")
    model = str(out / "models" / "model.pt")
    bundle_run(
        "inferring", *INFER, "--input_path", str(inputs), "--output_dir", str(out / "infer"), "--model_path", model
    )
    produced = sorted(os.listdir(out / "infer"))
    assert {
        "chest_heatmap.png",
        "scan_heatmap.png",
        "scan_heatmap.nii.gz",
        "slab_heatmap.nii.gz",
        "xray_heatmap.png",
        "xray_heatmap.nii.gz",
        "scores.csv",
    } <= set(produced)
    assert "chest_heatmap.nii.gz" not in produced
    rows = list(csv.reader(open(out / "infer" / "scores.csv")))
    assert sorted(os.path.basename(r[0]) for r in rows) == ["chest.png", "scan.nii.gz", "slab.nii.gz", "xray.dcm"]
    one_by_one = out / "infer_batch1"
    bundle_run("inferring", *INFER, "--input_path", str(inputs), "--output_dir", str(one_by_one), "--model_path", model,
               "--dataloader#batch_size", "1", "--alpha", "0.5")  # fmt: skip
    alone = {r[0]: (float(r[1]), float(r[2]), float(r[5])) for r in csv.reader(open(one_by_one / "scores.csv"))}
    assert alone.keys() == {r[0] for r in rows}
    assert all(np.isclose(float(r[1]), alone[r[0]][0], rtol=1e-4) for r in rows)  # batching changes no score
    settings = read_model(str(out / "models" / "model.pt"))[1]
    assert all(float(r[2]) == float(float(r[1]) > settings["threshold"]) for r in rows)  # file, score, abnormal (0/1)
    # the last column: the conformal p-value among the stored normal scores, in [1 / (n + 1), 1]
    n = len(settings["normal_scores"])
    assert n == settings["threshold_normals"] and settings["normal_scores"] == sorted(settings["normal_scores"])
    p_values = np.array([float(r[5]) for r in rows])
    assert all(len(r) == 6 for r in rows) and ((1 / (n + 1) - 1e-7 <= p_values) & (p_values <= 1 + 1e-7)).all()
    expected = conformal_p_value(np.array([float(r[1]) for r in rows]), settings["normal_scores"])
    np.testing.assert_allclose(p_values, expected, rtol=1e-6)
    # --alpha 0.5: abnormal is p_value <= 0.5 instead of score > threshold
    assert all(abnormal == float(p <= 0.5) for _, abnormal, p in alone.values())
    # in_domain (0/1) and domain_distance: the demo-like PNG is inside, uniform noise (scan.nii.gz) outside
    inside = {os.path.basename(r[0]): (float(r[3]), float(r[4])) for r in rows}
    assert inside["chest.png"][0] == 1.0 and inside["scan.nii.gz"][0] == 0.0
    assert inside["scan.nii.gz"][1] > inside["chest.png"][1] >= 0
    heat = nib.load(out / "infer" / "scan_heatmap.nii.gz")
    assert heat.shape[:2] == (64, 64)
    assert np.allclose(np.abs(np.diag(heat.affine))[:2], [0.5 * 80 / 64, 0.5 * 72 / 64], atol=1e-3)


def test_inferring_under_bf16_autocast_gives_nearly_the_float32_scores(trained, tiny_dataset, tmp_path):
    out, _, _ = trained
    images, model = os.path.join(tiny_dataset, "images"), str(out / "models" / "model.pt")
    scores = {}
    for dtype in ("$None", "bfloat16"):
        folder = tmp_path / dtype.strip("$")
        bundle_run("inferring", *INFER, "--input_path", images, "--output_dir", str(folder), "--model_path", model,
                   "--autocast_dtype", dtype)  # fmt: skip
        scores[dtype] = {r[0]: float(r[1]) for r in csv.reader(open(folder / "scores.csv"))}
    assert scores["$None"].keys() == scores["bfloat16"].keys() and len(scores["$None"]) >= 10
    f32, bf16 = (np.array([s[k] for k in sorted(scores["$None"])]) for s in scores.values())
    assert not np.array_equal(f32, bf16)  # the switch reaches the generator
    np.testing.assert_allclose(bf16, f32, rtol=0.05, atol=1e-3)


def fingerprint(path):
    return os.stat(path).st_mtime_ns, open(path, "rb").read()


@pytest.mark.parametrize("files", [["configs/train.json", "configs/evaluate.json"], ["configs/inference.json"]])
def test_no_run_id_never_trains(trained, tiny_dataset, files, tmp_path):
    """``monai.bundle run`` without a run id runs the merged files' own workflow: nothing is trained."""
    out, _, _ = trained
    model = out / "models" / "model.pt"
    before = fingerprint(model), sorted(os.listdir(out / "models"))
    log = bundle_run(
        None,
        "--config_file",
        str(files),
        "--dataset_dir",
        tiny_dataset if len(files) == 2 else os.path.join(tiny_dataset, "images"),
        "--ckpt_dir",
        str(out / "models"),
        "--eval_dir",
        str(tmp_path / "eval"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert "SAGANTrainer" not in log
    assert (fingerprint(model), sorted(os.listdir(out / "models"))) == before


def test_checkpoint_that_does_not_fit_names_the_settings(trained, tiny_dataset, tmp_path):
    out, _, _ = trained
    plain = tmp_path / "plain.pt"  # a bundle-0.1 style plain state dict, without settings
    torch.save(dict(read_model(str(out / "models" / "model.pt"))[0]), plain)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            *INFER,
            "--input_path",
            os.path.join(tiny_dataset, "images"),
            "--model_path",
            str(plain),
            "--output_dir",
            str(tmp_path / "out"),
            "--network_def",
            "$bundle.networks.SAGANGenerator(conv_dim=8, num_res_blocks=3)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "does not fit the configured generator SAGANGenerator (conv_dim: checkpoint 4, configured 8" in log
    assert "size mismatch" not in log  # no state-dict dump
    # without the override the plain state dict's architecture is inferred from its weights
    bundle_run(
        "inferring",
        *INFER,
        "--input_path",
        os.path.join(tiny_dataset, "images"),
        "--model_path",
        str(plain),
        "--output_dir",
        str(tmp_path / "out2"),
    )
    rows = list(csv.reader(open(tmp_path / "out2" / "scores.csv")))
    assert len(rows) == len(os.listdir(os.path.join(tiny_dataset, "images")))
    assert all(len(r) == 2 for r in rows)  # no threshold recorded: file, score


def test_metadata_and_network_verify(tmp_path):
    schema = os.path.join(ROOT, "..", "shared", "schemas", "meta_schema_20240725.json")
    if not os.path.isfile(schema):
        pytest.skip(f"{schema} is absent: verify_metadata would download it")
    local = tmp_path / "schema.json"
    shutil.copy(schema, local)
    for cmd in (
        ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(local)],
        [
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
        ],
    ):
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *cmd], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0 and " - ERROR - " not in proc.stdout + proc.stderr, proc.stderr[-3000:]
