# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Experiment tracking: ``monai.bundle run training --tracking configs/mlflow.json`` against a local MLflow store,
read back with the MLflow client (one process, and two processes under torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bundle.settings import read_model

from .conftest import ROOT

mlflow = pytest.importorskip("mlflow")

LOSS_TERMS = {"d_loss", "d_real", "d_fake", "gp", "g_loss", "g_adv", "g_identity", "g_restoration"}
VAL_METRICS = {"val_auc", "val_ap", "val_sensitivity", "val_specificity"}
TINY = [
    "--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4",
    "--val_interval", "2", "--progress_bar", "False", "--tensorboard_interval", "1",
]  # fmt: skip


def tracked_training(launcher: list[str], config_file: str, tmp_path, dataset: str, uri: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # MLFLOW_TRACKING_URI would win
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [*launcher, "-m", "monai.bundle", "run", "training", "--config_file", config_file]
    cmd += ["--tracking", "configs/mlflow.json", "--tracking_uri", uri, "--experiment_name", "sagan_test", *TINY]
    cmd += ["--dataset_dir", dataset, "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "tb")]
    proc = subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert " - ERROR - " not in log, log[-6000:]
    return log


def the_run(uri: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sagan_test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_training_records_params_losses_val_metrics_and_model(tiny_dataset, tmp_path):
    # MONAI 1.6's MLFlowHandler refuses file: URIs (MLflow 3.13+ dropped the file store): a local SQLite store
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracked_training([sys.executable], "configs/train.json", tmp_path, tiny_dataset, uri, "--iterations", "4")
    client, run = the_run(uri)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) >= LOSS_TERMS | VAL_METRICS
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [2, 4]  # trainer iterations
    params = run.data.params
    assert params["iterations"] == "4" and params["batch_size"] == "4" and params["world_size"] == "1"
    assert params["lr"] == "0.0002" and "'conv_dim': 4" in params["network_def"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in artifacts and any(a.startswith("config_") and a.endswith(".json") for a in artifacts)
    state, settings = read_model(client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path)))
    assert "stem.conv.weight" in state and settings["network_def"]["conv_dim"] == 4


def test_two_processes_record_one_run_from_rank_zero(tiny_dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    configs = "['configs/train.json','configs/multi_gpu_train.json']"
    tracked_training(launcher, configs, tmp_path, tiny_dataset, uri, "--iterations", "2")
    client, run = the_run(uri)
    assert run.data.params["world_size"] == "2"
    assert set(run.data.metrics) >= LOSS_TERMS | VAL_METRICS
    assert [m.step for m in client.get_metric_history(run.info.run_id, "d_loss")] == [1, 2]
