# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Runs the MONAI Label app's tests (tests/monailabel) in their own environment, .venv-monailabel: MONAI Label 0.8.5
needs numpy<2 and pydicom<3, which the bundle's .venv does not have. ``bash scripts/setup_monailabel.sh`` makes it;
without it the test is skipped, or fails under CI (environment variable CI set)."""

import os
import re
import subprocess

import pytest

from .conftest import ROOT

MONAILABEL_PYTHON = os.path.join(ROOT, ".venv-monailabel", "bin", "python")


def test_monailabel_app():
    if not os.path.isfile(MONAILABEL_PYTHON):
        message = f"{MONAILABEL_PYTHON} is missing: run bash scripts/setup_monailabel.sh to test the MONAI Label app"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [MONAILABEL_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/monailabel"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\b\d+ passed\b", summary), output[-6000:]
    assert not re.search(r"\b(failed|skipped|errors?)\b", summary), output[-6000:]
