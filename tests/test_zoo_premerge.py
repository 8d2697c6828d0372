"""The model zoo's premerge steps that run offline, on a fresh export of a tiny model (scripts/zoo_premerge.py, the
zoo unit test written from scripts/zoo_unit_test_template.py); with ``ZOO_CHECKOUT`` set to a checkout of the zoo,
the whole rehearsal (scripts/zoo_premerge.sh, which copies the bundle into that checkout)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY_SIZES

NAME = "sagan_demo_anomaly"
TINY = ["--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4", "--val_interval", "2"]
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

# the zoo's setup.cfg (Project-MONAI/model-zoo dfae206df112837d817e78d3727c9f32b3b52e82), its flake8 and isort parts
ZOO_SETUP_CFG = """[flake8]
select = B,C,E,F,N,P,T4,W,B9
max_line_length = 120
ignore =
    E203
    E501
    E741
    W503
    W504
    C408
    N812
    B023
    B905
    B028
    B907
    C419
per_file_ignores = __init__.py: F401, __main__.py: F401
exclude = *.pyi,.git,.eggs,monai/_version.py,versioneer.py,venv,.venv,_version.py

[isort]
known_first_party = models
profile = black
line_length = 120
skip = .git, .eggs, venv, .venv, versioneer.py, _version.py, conf.py
skip_glob = *.pyi
"""
ZOO_FLAKE8_PLUGINS = {  # package: module
    "pep8-naming": "pep8ext_naming",
    "flake8-bugbear": "bugbear",
    "flake8-comprehensions": "flake8_comprehensions",
    "flake8-executable": "flake8_executable",
}


def run(args, cwd, env=None, timeout=600):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def check(args, cwd, **kwargs):
    rc, log = run(args, cwd, **kwargs)
    assert rc == 0, log[-5000:]
    return log


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained (4 iterations), evaluated on its test split and exported by scripts/export_bundle.py."""
    from bundle.demo import make_demo_dataset

    work = tmp_path_factory.mktemp("zoo_premerge")
    demo = make_demo_dataset(str(work / "demo"), seed=1, sizes=TINY_SIZES)  # "demo": the export knows its terms
    check(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
         "--dataset_dir", demo, "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "runs"),
         "--iterations", "4", "--progress_bar", "False", *TINY],
        cwd=ROOT,
    )  # fmt: skip
    model = str(work / "models" / "model.pt")
    check(
        [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
         "['configs/train.json','configs/evaluate.json']", "--dataset_dir", demo, "--model_path", model,
         "--eval_dir", str(work / "eval"), "--progress_bar", "False"],
        cwd=ROOT,
    )  # fmt: skip
    check(
        [sys.executable, os.path.join(SCRIPTS, "export_bundle.py"), "--model", model, "--metrics",
         str(work / "eval" / "metrics.json"), "--output_dir", str(work / "dist"), "--name", NAME],
        cwd=work,
    )  # fmt: skip
    return work / "dist" / NAME


@pytest.fixture(scope="module")
def unit_test_file(exported):
    """The zoo unit test in the export (export_bundle.py writes it), else written here by write_zoo_unit_test."""
    from zoo_premerge import UNIT_TEST_DIR, write_zoo_unit_test

    path = exported.parent / UNIT_TEST_DIR / f"test_{NAME}.py"
    if not path.is_file():
        assert write_zoo_unit_test(str(exported), NAME) == str(path)
    return path


def test_write_zoo_unit_test_names_the_bundle(tmp_path):
    from zoo_premerge import write_zoo_unit_test

    path = write_zoo_unit_test(str(tmp_path / "other_bundle_x"), "other_bundle_x")
    assert path == str(tmp_path / "ci" / "unit_tests" / "test_other_bundle_x.py")
    text = open(path).read()
    assert "sagan_xray_anomaly" not in text and "SaganXrayAnomaly" not in text
    assert 'NAME = "other_bundle_x"' in text and "class TestOtherBundleX(unittest.TestCase)" in text
    assert "def test_order(" in text  # the zoo runner's ordering hook: train, eval, infer
    compile(text, path, "exec")


def test_zoo_unit_test_runs_on_the_export(exported, unit_test_file, tmp_path):
    """The unit test, as the zoo's ci/unit_tests/runner.py loads it (unittest, train -> eval -> infer), from another
    working directory; it finds the bundle beside ci/ (the export's tree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BUNDLE_ROOT", "PYTHONPATH")}
    runner = (
        "import importlib, sys, unittest; sys.path.insert(0, sys.argv[1]);"
        "module = importlib.import_module(sys.argv[2]);"
        "loader = unittest.TestLoader(); loader.sortTestMethodsUsing = module.test_order;"
        "result = unittest.TextTestRunner(verbosity=2).run(loader.loadTestsFromModule(module));"
        "sys.exit(not result.wasSuccessful())"
    )
    log = check([sys.executable, "-c", runner, str(unit_test_file.parent), unit_test_file.stem], cwd=tmp_path, env=env)
    assert "Ran 3 tests" in log and "test_train_config" in log.split("test_eval_config")[0], log[-3000:]


def test_zoo_flake8_plugins_and_isort(exported, unit_test_file, tmp_path):
    """flake8 with the zoo's setup.cfg and plugins, and isort with its settings, from a zoo-like root."""
    missing = [p for p, module in ZOO_FLAKE8_PLUGINS.items() if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"the zoo's flake8 plugins are not installed: {missing}")
    (tmp_path / "setup.cfg").write_text(ZOO_SETUP_CFG)
    (tmp_path / "models").symlink_to(exported.parent, target_is_directory=True)
    code = [f"models/{NAME}"]
    log = check([sys.executable, "-m", "flake8", "--version"], cwd=tmp_path)
    assert all(p in log for p in ZOO_FLAKE8_PLUGINS), log
    rc, log = run([sys.executable, "-m", "flake8", *code, "--count", "--statistics"], cwd=tmp_path)
    assert rc == 0, f"flake8 with the zoo's setup.cfg and plugins:\n{log[-5000:]}"
    check([sys.executable, "-m", "isort", "--check", "--diff", "--settings-path", str(tmp_path), *code], cwd=tmp_path)


def test_zoo_pre_commit_hooks(exported):
    """check-added-large-files --maxkb=1024 and the zoo's other pre-commit hooks on the export, staged in git."""
    if importlib.util.find_spec("pre_commit_hooks") is None:
        pytest.skip("pre-commit-hooks is not installed")
    log = check([sys.executable, os.path.join(SCRIPTS, "zoo_premerge.py"), "hooks", str(exported)], cwd=ROOT)
    assert "PASS pre-commit check-added-large-files --maxkb=1024" in log, log


def test_hooks_catch_a_large_file(exported):
    if importlib.util.find_spec("pre_commit_hooks") is None:
        pytest.skip("pre-commit-hooks is not installed")
    rc, log = run(
        [sys.executable, os.path.join(SCRIPTS, "zoo_premerge.py"), "hooks", str(exported), "--maxkb", "64"], cwd=ROOT
    )
    assert rc == 1 and "FAIL pre-commit check-added-large-files --maxkb=64" in log and "model.pt" in log, log


@pytest.mark.skipif(not os.environ.get("ZOO_CHECKOUT"), reason="ZOO_CHECKOUT (a model-zoo checkout) is not set")
def test_zoo_premerge_script(exported, unit_test_file):
    """scripts/zoo_premerge.sh in the zoo checkout: verify_bundle min and full, metadata, the unit test through the
    zoo's runner, flake8 / black / isort, pre-commit hooks. Replaces models/<name> in that checkout."""
    env = dict(os.environ, PYTHON=sys.executable)
    rc, log = run(["bash", os.path.join(SCRIPTS, "zoo_premerge.sh"), os.environ["ZOO_CHECKOUT"], str(exported)],
                  cwd=ROOT, env=env, timeout=900)  # fmt: skip
    assert rc == 0, log[-8000:]
