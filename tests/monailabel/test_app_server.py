# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""What the app adds around MONAI Label's server: log filters, the result's ``model`` part, the environment's
``monailabel`` launcher (written by scripts/setup_monailabel.sh)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess

import numpy as np
import pytest
import torch

from .helpers import ROOT

LAUNCHER = os.path.join(ROOT, ".venv-monailabel", "bin", "monailabel")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture()
def records():
    """Collects what the two filtered loggers emit (their own handlers: filters act there)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("monai.data.nvimgcodec_pydicom_plugin", "monailabel.tasks.infer.bundle")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler.messages
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_log_lines_that_say_nothing_are_filtered(records, png_image):
    """MONAI's nvImageCodec warning comes with every image read (each builds a DICOM reader): once per process;
    MONAI Label's "Label: restored image => 0" (the bundle's output channel, not the app's label): never."""
    from lib.server import _DropMessages, install_log_filters

    from bundle.transforms import load_grayscale

    plugin = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    for f in [f for f in plugin.filters if isinstance(f, _DropMessages)]:
        plugin.removeFilter(f)  # an app started earlier in this session installed them: start afresh
    install_log_filters()
    install_log_filters()  # idempotent
    for _ in range(3):
        load_grayscale(png_image)
    logging.getLogger("monailabel.tasks.infer.bundle").info(
        "Model: sagan; Type: segmentation; Label: restored image => 0"
    )
    logging.getLogger("monailabel.tasks.infer.bundle").info("another line")
    nv = [m for m in records if m.startswith("nvImageCodec is not available")]
    assert len(nv) <= 1 and "another line" in records
    assert not [m for m in records if "restored image" in m]


def test_result_model_part_has_no_nulls():
    """``model`` in the JSON result: what the model file records, a key it does not record left out."""
    from lib.transforms import SAGANResultd
    from monai.data import MetaTensor

    def result(settings):
        data = {"anomaly_label": MetaTensor(torch.zeros(1, 4, 4, dtype=torch.uint8)), "score": torch.tensor([0.1])}
        return SAGANResultd(settings, None)({**data, "image_path": "x.png"})["result"]["model"]

    recorded = {"bundle_version": "0.8.0", "iteration": 400, "selected_by": "val_auc", "image_size": 64}
    assert result({**recorded, "threshold": 0.2}) == recorded
    assert result({"bundle_version": "0.8.0", "iteration": None, "image_size": 64}) == {
        "bundle_version": "0.8.0",
        "image_size": 64,
    }


def test_launcher_passes_quoted_options_on(tmp_path):
    """The launcher that setup_monailabel.sh writes runs the python next to it (found through a link too) and passes
    every argument unchanged: ``--conf train_overrides "--iterations 50"`` stays one argument."""
    if not os.path.isfile(LAUNCHER):
        pytest.skip(f"{LAUNCHER} is missing: run bash scripts/setup_monailabel.sh")
    assert "monailabel.main" in open(LAUNCHER).read() and '"$@"' in open(LAUNCHER).read()
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    shutil.copy(LAUNCHER, fake / "monailabel")
    (fake / "python").write_text(
        "#!/bin/sh\nexec python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"
    )
    (fake / "python").chmod(stat.S_IRWXU)
    os.symlink(fake / "monailabel", tmp_path / "ml")
    args = ["start_server", "--conf", "train_overrides", "--iterations 50 --batch_size 8", "--studies", "a b"]
    out = subprocess.run(
        [str(tmp_path / "ml"), *args], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    assert json.loads(out.stdout) == ["-m", "monailabel.main", *args]


def test_launcher_runs_without_activation(tmp_path):
    if not os.path.isfile(LAUNCHER):
        pytest.skip(f"{LAUNCHER} is missing: run bash scripts/setup_monailabel.sh")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no virtual environment on PATH
    out = subprocess.run([LAUNCHER, "start_server", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "--conf" in out.stdout


def test_peak_heat_range_is_documented():
    """README states the range of peak_heat: the smoothed |x - x'| of images in [-1, 1], so [0, 2]."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "`peak_heat`" in readme and "[0, 2]" in readme
    from bundle.transforms.regions import smooth_heatmap

    extreme = torch.full((1, 64, 64), 2.0)
    assert float(smooth_heatmap(extreme).max()) <= 2.0 + 1e-6
    assert np.isclose(float(smooth_heatmap(extreme)[0, 32, 32]), 2.0, atol=1e-5)
