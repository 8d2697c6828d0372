# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The generator contract (docs/design.md, "Adding a generator"), tested with a generator the bundle has never seen.

:class:`TinyGenerator` below is the whole of a new generator: a module in ``bundle/networks/``, its class exported
from ``bundle/networks/__init__.py``, an ``hparams`` dict of its constructor arguments, ``forward`` (B, 1, H, W) in
[-1, 1] -> (B, 1, H, W) in (-1, 1), scriptable, and no ``forward_patches``. The test adds it to a copy of the bundle
(as a contributor would add it to the repository) and runs it through every stage there: ``run training`` with the
fast preset (``share_clean_patches`` on: without ``forward_patches`` the trainer must fall back to whole images),
``run evaluating``, ``run inferring``, ``scripts/export_bundle.py`` and MONAI Label's infer task.
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import bundle.networks
import bundle.settings
from bundle.settings import generator_from_settings, network_def_of, read_model

from .conftest import ROOT

MONAILABEL_PYTHON = os.path.join(ROOT, ".venv-monailabel", "bin", "python")
APP_DIR = os.path.join(ROOT, "scripts", "monailabel_app")
NAME = "tiny_contract_anomaly"
TINY = ["--d_conv_dim", "4", "--batch_size", "4", "--iterations", "4", "--val_interval", "2", "--log_interval", "1"]
TINY += ["--progress_bar", "False"]
TRAIN = "['configs/train.json','configs/presets/fast.json','configs/tiny.json']"
EVAL = "['configs/train.json','configs/evaluate.json']"


class TinyGenerator(nn.Module):
    """A new generator in a few lines: x' = tanh(x + m(x)), m two 3x3 convolutions; (B, C, H, W) in [-1, 1] ->
    (B, C, H, W) in (-1, 1). ``hparams``: the constructor arguments (JSON values), which the model file records and
    from which evaluation, inference, export and MONAI Label rebuild the generator."""

    __jit_ignored_attributes__ = ["hparams"]  # a dict of mixed value types has no TorchScript type

    def __init__(self, in_channels: int = 1, width: int = 4) -> None:
        super().__init__()
        self.hparams = {"in_channels": in_channels, "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, in_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x + self.body(x))


TINY_MODULE = (
    '"""A new generator added by tests/test_generator_contract.py."""\n\n'
    "from __future__ import annotations\n\nimport torch\nfrom torch import nn\n\n\n" + inspect.getsource(TinyGenerator)
)
TINY_NETWORK_DEF = {"_target_": "bundle.networks.TinyGenerator", "in_channels": 1, "width": 4}


def run(args: list[str], cwd: str | Path, python: str = sys.executable) -> str:
    """``python args`` in ``cwd`` (no inherited PYTHONPATH: the copy's ``bundle`` must be the one imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert " - ERROR - " not in log, log[-4000:]
    return log


@pytest.fixture(scope="module")
def repo_with_tiny(tmp_path_factory) -> Path:
    """A copy of the repository's code (bundle/, configs/, the export's scripts and docs) with TinyGenerator added
    as the contract says: ``bundle/networks/tiny.py``, exported from ``bundle/networks/__init__.py``; and
    ``configs/tiny.json``, the override that selects it for training (as ``configs/presets/brainomaly.json`` does)."""
    root = tmp_path_factory.mktemp("repo")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("bundle", "configs"):
        shutil.copytree(os.path.join(ROOT, name), root / name, ignore=ignore)
    (root / "scripts").mkdir()
    for name in ("export_bundle.py", "zoo_premerge.py", "zoo_unit_test_template.py"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts")
    (root / "docs").mkdir()
    for name in ("README.md", "results.md", "performance.md"):
        shutil.copy(os.path.join(ROOT, "docs", name), root / "docs")
    for name in ("LICENSE", "metadata.json"):
        shutil.copy(os.path.join(ROOT, name), root)
    (root / "bundle" / "networks" / "tiny.py").write_text(TINY_MODULE)
    with open(root / "bundle" / "networks" / "__init__.py", "a") as f:
        f.write("from .tiny import TinyGenerator\n")
    network_def = {k: v if k != "width" else "@tiny_width" for k, v in TINY_NETWORK_DEF.items()}
    (root / "configs" / "tiny.json").write_text(json.dumps({"tiny_width": 4, "network_def": network_def}))
    return root


@pytest.fixture
def registered(monkeypatch):
    """TinyGenerator importable as ``bundle.networks.TinyGenerator`` in this process (as the copy's
    ``bundle/networks/__init__.py`` makes it there)."""
    monkeypatch.setattr(bundle.networks, "TinyGenerator", TinyGenerator, raising=False)


# ------------------------------------------------------------------ the contract's rules, in this process


def test_network_def_names_the_generator_and_rebuilds_it(registered):
    net = TinyGenerator(width=3).eval()
    network_def = network_def_of(net)
    assert network_def == {"_target_": "bundle.networks.TinyGenerator", "in_channels": 1, "width": 3}
    assert json.loads(json.dumps(network_def)) == network_def  # the settings are plain values
    rebuilt = generator_from_settings({"network_def": network_def}).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    assert torch.equal(rebuilt(x), net(x))
    assert torch.allclose(net(x[:1]), net(x)[:1], atol=1e-6)  # per image: no statistics across the batch
    torch.jit.script(net)  # the export writes models/model.ts with torch.jit.script


def test_a_generator_without_hparams_is_refused_clearly(registered, monkeypatch):
    class NoHparams(TinyGenerator):
        pass

    monkeypatch.setattr(bundle.networks, "NoHparams", NoHparams, raising=False)
    net = NoHparams()
    del net.hparams
    with pytest.raises(TypeError, match="NoHparams has no 'hparams'"):
        network_def_of(net)


def test_a_generator_outside_bundle_networks_is_named_clearly(monkeypatch, caplog):
    """Trained, but its model names ``bundle.networks.TinyGenerator``, which does not exist: a warning when the
    model is written, and the stages that rebuild the generator refuse it saying where it must be defined."""
    monkeypatch.setattr(bundle.settings, "_WARNED_OUTSIDE", set())
    with caplog.at_level(logging.WARNING, logger="bundle.settings"):
        network_def = network_def_of(TinyGenerator())
    assert "is not bundle.networks.TinyGenerator" in caplog.text and "bundle/networks/__init__.py" in caplog.text
    with pytest.raises(ValueError, match=r"bundle\.networks\.TinyGenerator.*does not have.*bundle/networks/"):
        generator_from_settings({"network_def": network_def})


def test_a_generator_whose_hparams_are_not_json_is_refused_clearly(registered):
    net = TinyGenerator()
    net.hparams = {**net.hparams, "dtype": torch.float32}
    with pytest.raises(TypeError, match="TinyGenerator.hparams.*JSON"):
        network_def_of(net)


def test_settings_from_a_file_build_only_bundle_networks():
    with pytest.raises(ValueError, match="only bundle.networks classes are built"):
        generator_from_settings({"network_def": {"_target_": "os.system", "command": "true"}})


# ------------------------------------------------------------------ every stage, in a copy of the repository


@pytest.fixture(scope="module")
def trained(repo_with_tiny, tiny_dataset) -> tuple[Path, str, float]:
    start = time.perf_counter()
    log = run(
        ["-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", tiny_dataset,
         "--ckpt_dir", str(repo_with_tiny / "models"), "--output_dir", str(repo_with_tiny / "runs"), *TINY],
        cwd=repo_with_tiny,
    )  # fmt: skip
    return repo_with_tiny, log, time.perf_counter() - start


def test_training(trained, registered):
    root, log, seconds = trained
    print(f"training: {seconds:.1f} s")
    # fast preset, no forward_patches: the trainer says so and runs every FPI(x_n) image through forward
    assert "share_clean_patches: TinyGenerator cannot run on patches" in log
    assert "val_auc" in log and "g_restoration" in log
    assert "is not bundle.networks" not in log  # network_def_of found the class where the model file says it is
    state, settings = read_model(str(root / "models" / "model.pt"))
    assert settings["network_def"] == TINY_NETWORK_DEF  # the model file names the new generator
    assert 0 < settings["threshold"] < 1 and settings["iteration"] in (2, 4)
    net = generator_from_settings(settings)
    assert type(net) is TinyGenerator
    net.load_state_dict(state, strict=True)


@pytest.fixture(scope="module")
def evaluated(trained, tiny_dataset) -> tuple[Path, float]:
    root, _, _ = trained
    start = time.perf_counter()
    run(
        ["-m", "monai.bundle", "run", "evaluating", "--config_file", EVAL, "--dataset_dir", tiny_dataset,
         "--ckpt_dir", str(root / "models"), "--eval_dir", str(root / "eval")],
        cwd=root,
    )  # fmt: skip
    return root, time.perf_counter() - start


def eval_scores(root: Path) -> dict[str, float]:
    """File name -> score of the evaluation's scores.csv."""
    return {os.path.basename(r["file"]): float(r["score"]) for r in csv.DictReader(open(root / "eval" / "scores.csv"))}


def test_evaluation(evaluated):
    root, seconds = evaluated
    print(f"evaluating: {seconds:.1f} s")
    metrics = json.load(open(root / "eval" / "metrics.json"))
    assert 0 <= metrics["auc"] <= 1 and metrics["split"] == "test"
    assert metrics["threshold"] == read_model(str(root / "models" / "model.pt"))[1]["threshold"]
    assert len(list(csv.DictReader(open(root / "eval" / "scores.csv")))) == 12


def test_inference(evaluated, tiny_dataset):
    root, _ = evaluated
    images = os.path.join(tiny_dataset, "images")
    start = time.perf_counter()
    run(
        ["-m", "monai.bundle", "run", "inferring", "--config_file", "configs/inference.json", "--input_path", images,
         "--output_dir", str(root / "infer"), "--model_path", str(root / "models" / "model.pt")],
        cwd=root,
    )  # fmt: skip
    print(f"inferring: {time.perf_counter() - start:.1f} s")
    rows = list(csv.reader(open(root / "infer" / "scores.csv")))
    assert sorted(os.path.basename(r[0]) for r in rows) == sorted(os.listdir(images))  # one row per image
    # inference places the generator otherwise (channels-last, Winograd convolutions on the CPU): same scores
    inferred = {os.path.basename(r[0]): float(r[1]) for r in rows}
    for name, score in eval_scores(root).items():
        assert inferred[name] == pytest.approx(score, rel=1e-4, abs=1e-6), name


@pytest.fixture(scope="module")
def exported(evaluated) -> tuple[Path, float]:
    root, _ = evaluated
    (root / "terms.txt").write_text("Synthetic images made by bundle/demo.py for the tests.")
    start = time.perf_counter()
    run(
        [str(root / "scripts" / "export_bundle.py"), "--model", str(root / "models" / "model.pt"), "--output_dir",
         str(root / "dist"), "--name", NAME, "--metrics", str(root / "eval" / "metrics.json"), "--data_license",
         str(root / "terms.txt")],
        cwd=root,
    )  # fmt: skip
    return root / "dist", time.perf_counter() - start


def test_export_carries_the_generator(exported):
    dist, seconds = exported
    print(f"export: {seconds:.1f} s")
    folder = dist / NAME
    inference = json.load(open(folder / "configs" / "inference.json"))
    assert inference["network_def"] == TINY_NETWORK_DEF
    assert (folder / "bundle" / "networks" / "tiny.py").read_text() == TINY_MODULE  # the generator's code
    assert (folder / "models" / "model.ts").is_file()  # scripted
    names = zipfile.ZipFile(dist / f"{NAME}.zip").namelist()
    assert f"{NAME}/bundle/networks/tiny.py" in names and f"{NAME}/models/model.pt" in names


MONAILABEL_INFER = """
import json, sys
bundle_dir, app_dir, model, image = sys.argv[1:5]
sys.path[:0] = [bundle_dir, app_dir]
from lib.infers import SAGANInferTask
task = SAGANInferTask(bundle_dir, [model], {})
label, result = task({"image": image, "device": "cpu"})
print("RESULT " + json.dumps({"label": label, **result}))
"""


def test_monailabel_infer_task(evaluated, tiny_dataset):
    if not os.path.isfile(MONAILABEL_PYTHON):
        pytest.skip(f"{MONAILABEL_PYTHON} is missing: run bash scripts/setup_monailabel.sh to test the MONAI Label app")
    root, _ = evaluated
    image = os.path.join(tiny_dataset, "images", "test_1_0000.png")
    start = time.perf_counter()
    log = run(
        ["-c", MONAILABEL_INFER, str(root), APP_DIR, str(root / "models" / "model.pt"), image],
        cwd=root,
        python=MONAILABEL_PYTHON,
    )
    print(f"MONAI Label infer task: {time.perf_counter() - start:.1f} s")
    result = json.loads(next(line for line in log.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert result["anomaly_score"] == pytest.approx(eval_scores(root)["test_1_0000.png"], rel=1e-4, abs=1e-6)
    assert os.path.isfile(result["label"])
