"""The pins install where the bundle is used: every pin of requirements.txt, requirements-dev.txt and metadata.json has
a wheel for Python 3.10 (the MONAI model zoo's CI runs 3.10.14), 3.11 and 3.12 on this platform, and requirements.txt
and metadata.json pin the same versions.

The wheel check asks the package index (``pip download --only-binary=:all: --no-deps --python-version X``, one pip
call per Python version): it is skipped when the index cannot be reached. torch is looked up in the index's list of
wheels for that Python (``pip index versions``) instead of downloaded: PyPI's Linux wheel is the CUDA build (over
500 MB), and the CPU build here comes from another index."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

PYTHONS = ["3.10", "3.11", "3.12"]
# metadata.json's version keys of single packages
METADATA_PACKAGES = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}
NOT_DOWNLOADED = {"torch"}  # looked up with pip index versions (see the module docstring)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--timeout", "60", "--retries", "2"]


def requirement_pins(filename: str, python: str) -> dict[str, str]:
    """``{name: version}`` of the ``name==version`` lines of a requirements file whose marker holds on ``python``
    (pip evaluates markers against the Python that runs it, not ``--python-version``)."""
    pins = {}
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    with open(os.path.join(ROOT, filename)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            specs = list(req.specifier)
            if len(specs) == 1 and specs[0].operator == "==":
                pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def metadata_pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "metadata.json")) as f:
        meta = json.load(f)
    pins = {canonicalize_name(package): meta[key] for key, package in METADATA_PACKAGES.items()}
    for key in ("required_packages_version", "optional_packages_version"):
        pins.update({canonicalize_name(name): version for name, version in meta.get(key, {}).items()})
    return pins


def all_pins(python: str) -> dict[str, str]:
    pins = {**requirement_pins("requirements.txt", python), **metadata_pins()}
    pins.update(requirement_pins("requirements-dev.txt", python))
    return pins


def test_requirements_and_metadata_pin_the_same_versions():
    requirements, metadata = requirement_pins("requirements.txt", "3.10"), metadata_pins()
    assert requirements == metadata, "requirements.txt and metadata.json disagree"
    for python in PYTHONS:  # requirements.txt has no markers: the same pins on every Python
        assert requirement_pins("requirements.txt", python) == requirements


@pytest.fixture(scope="module")
def index_reachable():
    """Skips when the package index does not answer (no network)."""
    proc = subprocess.run(
        [*PIP, "index", "versions", "fire", "--only-binary=:all:"], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 or "Available versions" not in proc.stdout:
        pytest.skip(f"the package index is unreachable: {(proc.stdout + proc.stderr).strip()[-500:]}")


@pytest.mark.parametrize("python", PYTHONS)
def test_every_pin_has_a_wheel_for(python, index_reachable, tmp_path):
    pins = all_pins(python)
    wanted = [f"{name}=={version}" for name, version in sorted(pins.items()) if name not in NOT_DOWNLOADED]
    cmd = [*PIP, "download", "--only-binary=:all:", "--no-deps", "--python-version", python, "-d", str(tmp_path)]
    proc = subprocess.run([*cmd, *wanted], capture_output=True, text=True, timeout=900)
    shutil.rmtree(tmp_path, ignore_errors=True)  # tens of MB of wheels
    errors = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line)
    assert proc.returncode == 0, f"Python {python}: {errors or proc.stderr[-3000:]}"

    for name in NOT_DOWNLOADED & pins.keys():
        proc = subprocess.run(
            [*PIP, "index", "versions", name, "--only-binary=:all:", "--python-version", python],
            capture_output=True,
            text=True,
            timeout=300,
        )
        listed = re.search(r"Available versions: (.*)", proc.stdout)
        assert listed, f"Python {python}: {name}: {(proc.stdout + proc.stderr)[-2000:]}"
        assert pins[name] in listed.group(1).split(", "), f"Python {python}: no {name} {pins[name]} wheel"
