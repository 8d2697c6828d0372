"""Pictures for people: the annotated extremes figure of an evaluation."""

import numpy as np
import torch
from PIL import Image

from bundle.visualize import column_titles, save_extremes


def test_titles_name_false_alarms_and_misses():
    titles = column_titles([0.30, 0.20, 0.10, 0.05], [1, 0, 1, 0], threshold=0.15)
    assert titles == [
        ("0.300 / abnormal", "black"),
        ("0.200 / normal\nfalse alarm", "red"),
        ("0.100 / abnormal\nmissed", "red"),
        ("0.050 / normal", "black"),
    ]
    assert column_titles([0.15], [1], threshold=0.15) == [("0.150 / abnormal\nmissed", "red")]  # score > threshold
    assert column_titles([0.15], [0], threshold=0.15) == [("0.150 / normal", "black")]
    assert column_titles([0.2, 0.1], threshold=0.15) == [("0.200", "black"), ("0.100", "black")]  # no labels
    assert column_titles([0.2], [0]) == [("0.200 / normal", "black")]  # no threshold: no call


def red_pixels(path):
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_extremes_figure(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 64, 64, generator=gen) * 2 - 1
    restored = images * 0.5
    save_extremes(str(tmp_path / "wrong.png"), images, restored, [0.3, 0.2, 0.1, 0.05], [1, 0, 1, 0], 0.15, n_high=2)
    save_extremes(str(tmp_path / "right.png"), images, restored, [0.3, 0.2, 0.1, 0.05], [1, 1, 0, 0], 0.15, n_high=2)
    width, height = Image.open(tmp_path / "wrong.png").size
    assert width > 4 * 64 and height > 3 * 64
    assert red_pixels(tmp_path / "wrong.png") > 20 and red_pixels(tmp_path / "right.png") == 0
