"""The model-zoo export (scripts/export_bundle.py) and the zoo's own checks, run on the exported folder from another
working directory, as the zoo's CI and a user elsewhere would."""

import csv
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from bundle.settings import generator_from_settings, read_model

from .conftest import ROOT

NAME = "sagan_demo_anomaly"
# the README's ONNX export: a dynamic batch axis
ONNX_DYNAMIC_BATCH = (
    "{'input_names': ['image'], 'output_names': ['pred'], "
    "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}"
)
TERMS = "Synthetic images made by bundle/demo.py for the tests."
TINY = ["--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4", "--val_interval", "2"]


def run(args, cwd, bundle_dir=None):
    env = dict(os.environ, PYTHONPATH=bundle_dir) if bundle_dir else None
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " - ERROR - " not in log, log[-4000:]
    return log


@pytest.fixture(scope="module")
def exported(tiny_dataset, tmp_path_factory):
    """A tiny model trained by the repository's configs and exported with scripts/export_bundle.py."""
    work = tmp_path_factory.mktemp("zoo")
    run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
         "--dataset_dir", tiny_dataset, "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "tb"),
         "--iterations", "4", "--progress_bar", "False", *TINY],
        cwd=ROOT,
    )  # fmt: skip
    run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
         "['configs/train.json','configs/evaluate.json']", "--dataset_dir", tiny_dataset, "--ckpt_dir",
         str(work / "models"), "--eval_dir", str(work / "eval")],
        cwd=ROOT,
    )  # fmt: skip
    (work / "terms.txt").write_text(TERMS)  # the tiny set's folder name is not one the export knows
    export = os.path.join(ROOT, "scripts", "export_bundle.py")
    run(
        [sys.executable, export, "--model", str(work / "models" / "model.pt"), "--output_dir", str(work / "dist"),
         "--name", NAME, "--metrics", str(work / "eval" / "metrics.json"), "--data_license", str(work / "terms.txt")],
        cwd=work,
    )  # fmt: skip
    return work, work / "dist" / NAME


def bundle_cmd(folder, *args, bundle_root=True):
    """``python -m monai.bundle <args>`` on the exported folder's configs."""
    root = ["--bundle_root", str(folder)] if bundle_root else []
    return [sys.executable, "-m", "monai.bundle", *args, "--meta_file", str(folder / "configs" / "metadata.json"),
            *root]  # fmt: skip


def test_layout_and_large_files(exported):
    work, folder = exported
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                "configs/logging.conf", "models/model.pt", "models/model.ts", "docs/README.md",
                "docs/data_license.txt", "LICENSE", "large_files.yml", "bundle/__init__.py"):  # fmt: skip
        assert (folder / rel).is_file(), rel
    meta = json.load(open(folder / "configs" / "metadata.json"))
    root_meta = json.load(open(os.path.join(ROOT, "metadata.json")))
    major, minor, patch = root_meta["version"].split(".")
    assert meta["version"] == f"{major}.{minor}.{int(patch) + 1}" and meta["version"] in meta["changelog"]
    inference = json.load(open(folder / "configs" / "inference.json"))
    state, settings = read_model(str(folder / "models" / "model.pt"))
    assert inference["network_def"] == settings["network_def"] and inference["threshold"] == settings["threshold"]
    assert "model_settings" not in inference  # self-contained: MONAI Label reads only this file
    plain = torch.load(folder / "models" / "model.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in plain.values()) and plain.keys() == state.keys()  # a plain state dict
    large = yaml.safe_load(open(folder / "large_files.yml"))["large_files"]
    assert large == []  # the tiny model is below 1 MiB
    metrics = json.load(open(work / "eval" / "metrics.json"))
    assert meta["eval_metrics"] == {k: metrics[k] for k in ("auc", "ap", "sensitivity", "specificity")}
    assert TERMS in (folder / "docs" / "data_license.txt").read_text()
    assert "../shared" not in (folder / "docs" / "data_license.txt").read_text()
    names = zipfile.ZipFile(work / "dist" / f"{NAME}.zip").namelist()
    assert f"{NAME}/models/model.pt" in names and f"{NAME}/configs/metadata.json" in names
    # the zoo's unit test sits beside the bundle, as in the zoo's tree, not inside the bundle or its zip
    assert (work / "dist" / "ci" / "unit_tests" / f"test_{NAME}.py").is_file()
    assert not any("unit_test" in n for n in names) and not any("unit_test" in str(p) for p in folder.rglob("*"))


def test_large_files_are_listed_with_hash_and_left_out_of_the_zip(exported, tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_bundle

    work, _ = exported
    # the tiny model.pt (~100 kB) counts as large, inference.json (~20 kB: the settings written in) does not
    monkeypatch.setattr(export_bundle, "LARGE_FILE_BYTES", 50_000)
    folder = export_bundle.export(
        str(work / "models" / "model.pt"),
        str(tmp_path),
        NAME,
        metrics_file=str(work / "eval" / "metrics.json"),
        url_base="https://host/x",
        data_license=str(work / "terms.txt"),
    )
    large = {e["path"]: e for e in yaml.safe_load(open(os.path.join(folder, "large_files.yml")))["large_files"]}
    assert {"models/model.pt", "models/model.ts"} <= set(large)
    entry = large["models/model.pt"]
    assert entry["url"] == "https://host/x/models/model.pt" and entry["hash_type"] == "sha256"
    assert entry["hash_val"] == export_bundle.sha256(os.path.join(folder, "models", "model.pt"))
    names = zipfile.ZipFile(tmp_path / f"{NAME}.zip").namelist()
    assert f"{NAME}/models/model.pt" not in names and f"{NAME}/configs/inference.json" in names


@pytest.mark.parametrize("name", ["sagan_detection", "SAGAN", "sagan-x", "chest_segmentation_sagan"])
def test_bundle_name_rules(name):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_bundle

    with pytest.raises(ValueError, match="bundle name"):
        export_bundle.check_name(name)


def test_metadata_verifies_and_pins_the_installed_versions(exported, tmp_path):
    _, folder = exported
    schema = os.path.join(ROOT, "..", "shared", "schemas", "meta_schema_20240725.json")
    if not os.path.isfile(schema):
        pytest.skip(f"{schema} is absent: verify_metadata would download it")
    shutil.copy(schema, tmp_path / "schema.json")
    run(
        bundle_cmd(folder, "verify_metadata", "--filepath", str(tmp_path / "schema.json"), bundle_root=False),
        cwd=tmp_path,
    )
    meta = json.load(open(folder / "configs" / "metadata.json"))
    installed = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}
    for key, package in installed.items():
        assert meta[key] == importlib.metadata.version(package).split("+")[0], key
    for package, version in meta["required_packages_version"].items():
        assert importlib.metadata.version(package) == version, package


def test_net_in_out_torchscript_and_onnx_parity(exported, tmp_path):
    """The zoo's verify_net_in_out and ckpt_export with the zoo's arguments (no key_in_ckpt), and the README's ONNX
    command with a dynamic batch axis: TorchScript and onnxruntime agree with the eager generator at batch 1 and 3."""
    _, folder = exported
    cfg = ["--config_file", str(folder / "configs" / "inference.json")]
    run(bundle_cmd(folder, "verify_net_in_out", "network_def", *cfg), cwd=tmp_path, bundle_dir=str(folder))
    ts = tmp_path / "verify_model.ts"
    run(bundle_cmd(folder, "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file",
                   str(folder / "models" / "model.pt"), *cfg),
        cwd=tmp_path, bundle_dir=str(folder))  # fmt: skip
    onnx_file = tmp_path / "model.onnx"
    run(bundle_cmd(folder, "onnx_export", "network_def", "--filepath", str(onnx_file), "--ckpt_file",
                   str(folder / "models" / "model.pt"), "--input_shape", "[1, 1, 64, 64]", "--converter_kwargs",
                   ONNX_DYNAMIC_BATCH, *cfg),
        cwd=tmp_path, bundle_dir=str(folder))  # fmt: skip

    state, settings = read_model(str(folder / "models" / "model.pt"))
    eager = generator_from_settings(settings).eval()
    eager.load_state_dict(state)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 1, 64, 64, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        with torch.no_grad():
            expected = eager(x)
            for path in (ts, folder / "models" / "model.ts"):
                scripted = torch.jit.load(str(path)).eval()
                assert (scripted(x) - expected).abs().max() <= 1e-5, (path, batch)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert out.shape == tuple(expected.shape) and np.abs(out - expected.numpy()).max() <= 1e-4, batch


def test_monai_loaders_give_the_trained_generator_or_an_error(exported, tmp_path):
    """Every way MONAI loads ``models/model.pt`` yields the trained weights, never a silently random network:
    ``monai.bundle.load`` with and without ``key_in_ckpt`` (a wrong key is an error), ``CheckpointLoader`` strict
    and not, and ``ckpt_export`` as the zoo calls it. The same holds for the repository's own model file."""
    import monai.bundle
    from ignite.engine import Engine
    from monai.handlers import CheckpointLoader

    work, folder = exported
    hub = tmp_path / "hub"
    shutil.copytree(folder, hub / NAME)
    expected, settings = read_model(str(folder / "models" / "model.pt"))
    trained_in_repo, _ = read_model(str(work / "models" / "model.pt"))
    assert all(torch.equal(trained_in_repo[k], v) for k, v in expected.items())

    def assert_trained(net):
        state = net.state_dict()  # a TorchScript module lists its non-persistent buffers too
        assert expected.keys() <= state.keys() and all(k.endswith(".codes") for k in state.keys() - expected.keys())
        assert all(torch.equal(state[k], v) for k, v in expected.items())

    sys.path.insert(0, str(hub / NAME))
    assert_trained(monai.bundle.load(NAME, bundle_dir=str(hub), workflow_type="inference", device="cpu"))
    with pytest.raises(KeyError, match="model"):  # the <= 0.7 spelling: an error, not a random generator
        monai.bundle.load(NAME, bundle_dir=str(hub), workflow_type="inference", key_in_ckpt="model", device="cpu")
    for path in (folder / "models" / "model.pt", work / "models" / "model.pt"):
        for strict in (True, False):
            net = generator_from_settings(settings)
            CheckpointLoader(str(path), {"model": net}, strict=strict)(Engine(lambda e, b: None))
            assert_trained(net)
    ts = tmp_path / "zoo.ts"
    monai.bundle.ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(work / "models" / "model.pt"),
        meta_file=str(folder / "configs" / "metadata.json"),
        config_file=str(folder / "configs" / "inference.json"),
        bundle_root=str(folder),
    )
    assert_trained(torch.jit.load(str(ts)))


def test_exported_docs_link_only_inside_the_export(exported):
    import re

    _, folder = exported
    docs = sorted((folder / "docs").glob("*.md"))
    assert {d.name for d in docs} >= {"README.md", "results.md", "performance.md"}
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            assert (doc.parent / target.split("#")[0]).is_file(), f"{doc.name} links to {target}"
    card = (folder / "docs" / "README.md").read_text()
    assert card.startswith("# This bundle's model") and "auc " in card


def test_export_refuses_metrics_of_another_model_and_unknown_data_terms(exported, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import export_bundle

    work, _ = exported
    model, metrics = str(work / "models" / "model.pt"), str(work / "eval" / "metrics.json")
    with pytest.raises(FileNotFoundError, match="run `python -m monai.bundle run evaluating"):
        export_bundle.export(model, str(tmp_path), NAME, metrics_file=str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="pass --data_license"):
        export_bundle.export(model, str(tmp_path), NAME, metrics_file=metrics)
    other = tmp_path / "other.pt"
    shutil.copy(model, other)
    with pytest.raises(ValueError, match="not an evaluation of .*other.pt"):
        export_bundle.export(
            str(other), str(tmp_path), NAME, metrics_file=metrics, data_license=str(work / "terms.txt")
        )
    stale = tmp_path / "stale.json"  # the same path evaluated before the model was trained again
    stale.write_text(json.dumps({**json.load(open(metrics)), "threshold": 12.5}))
    with pytest.raises(ValueError, match="the model's threshold is"):
        export_bundle.export(model, str(tmp_path), NAME, metrics_file=str(stale), data_license=str(work / "terms.txt"))
    assert not (tmp_path / NAME).exists()


def test_zoo_style_workflow_train_then_infer(exported, tiny_dataset, tmp_path, monkeypatch):
    """As the zoo's ci/unit_tests: ConfigWorkflow with check_properties, train 2 iterations, then infer."""
    from monai.bundle import ConfigWorkflow

    _, folder = exported
    sys.path.insert(0, str(folder))  # the bundle's Python package, as `monai.bundle run` adds it
    monkeypatch.chdir(tmp_path)
    train = ConfigWorkflow(
        config_file=str(folder / "configs" / "train.json"),
        meta_file=str(folder / "configs" / "metadata.json"),
        logging_file=str(folder / "configs" / "logging.conf"),
        workflow_type="train",
        bundle_root=str(folder),
        dataset_dir=tiny_dataset,
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "tb"),
        iterations=2,
        val_interval=1,
        batch_size=4,
        progress_bar=False,
    )
    train.initialize()
    assert train.check_properties() == []
    train.run()
    train.finalize()
    assert (tmp_path / "models" / "model.pt").is_file()
    torch.set_grad_enabled(True)
    infer = ConfigWorkflow(
        config_file=str(folder / "configs" / "inference.json"),
        meta_file=str(folder / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(folder),
        dataset_dir=os.path.join(tiny_dataset, "images"),
        output_dir=str(tmp_path / "out"),
    )
    infer.initialize()
    assert infer.check_properties() == []
    infer.run()
    infer.finalize()
    rows = list(csv.reader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == len(os.listdir(os.path.join(tiny_dataset, "images")))


def test_load_from_zip_scores_like_run_inferring(exported, tiny_dataset, tmp_path):
    """``monai.bundle.load`` on the unzipped bundle returns the generator; it scores as ``run inferring`` does."""
    import monai.bundle

    from bundle.transforms import anomaly_score

    work, folder = exported
    hub = tmp_path / "hub"
    zipfile.ZipFile(work / "dist" / f"{NAME}.zip").extractall(hub)
    run(bundle_cmd(hub / NAME, "run", "inferring", "--config_file", str(hub / NAME / "configs" / "inference.json"),
                   "--output_dir", str(tmp_path / "out")),
        cwd=tmp_path)  # fmt: skip
    scores = {os.path.basename(r[0]): float(r[1]) for r in csv.reader(open(tmp_path / "out" / "scores.csv"))}
    assert sorted(scores) == sorted(os.listdir(hub / NAME / "sample_data"))  # the default input is in the zip
    image = str(hub / NAME / "sample_data" / "test_1_0000.png")
    expected = scores["test_1_0000.png"]

    sys.path.insert(0, str(hub / NAME))
    net = monai.bundle.load(NAME, bundle_dir=str(hub), workflow_type="inference", device="cpu")
    net.eval()
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(hub / NAME / "configs" / "inference.json"))
    parser["bundle_root"] = str(hub / NAME)
    x = parser.get_parsed_content("preprocessing")({"image": image})["image"].as_tensor()[None]
    with torch.no_grad():
        score = float(anomaly_score(x, net(x)))
    assert abs(score - expected) <= 1e-6


def test_exported_code_passes_the_zoo_style_checks(exported):
    """The zoo's code style: black --skip-magic-trailing-comma, isort and flake8 at line length 120."""
    _, folder = exported
    code = str(folder / "bundle")
    bin_dir = os.path.dirname(sys.executable)
    for cmd in (
        ["black", "--check", "--skip-magic-trailing-comma", "-l", "120", code],
        ["isort", "--check-only", "--profile", "black", "-l", "120", code],
        [
            "flake8",
            "--max-line-length",
            "120",
            "--extend-ignore",
            "E203,W503",
            "--per-file-ignores",
            "__init__.py:F401",
            code,
        ],
    ):
        proc = subprocess.run([os.path.join(bin_dir, cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd[:1])}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
