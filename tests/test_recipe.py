"""Tests that pin the recipe as configs/train.json declares it, each aimed at one behaviour a mutation of the code or
the config could change while every other test stays green (docs/reliability.md, mutation table): the loss weights
that reach the losses, the anomaly ratio of T_u, which images reach training, the operating threshold's quantile,
the attention gate's output and the resize of the input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from bundle.networks.generator import AttentionGate

from .conftest import ROOT

TINY = {"conv_dim": 4, "num_res_blocks": 1, "d_conv_dim": 4, "batch_size": 4, "progress_bar": False}


def parser_for(dataset: str, tmp_path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.update(
        {
            "dataset_dir": dataset,
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "tb"),
            "device": "$torch.device('cpu')",
            **TINY,
            **overrides,
        }
    )
    return parser


def test_published_loss_weights_are_the_defaults():
    """SPEC.md, Training: critic loss -mean(D(x_n)) + mean(D(G(x_u))) + 10 * GP; the generator's identity and
    restoration terms weigh 1 each."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    assert (parser["lambda_gp"], parser["lambda_identity"], parser["lambda_restoration"]) == (10.0, 1.0, 1.0)


def test_distinct_loss_weights_reach_the_losses(tiny_dataset, tmp_path):
    """Weights 7 (gp), 2 (identity) and 5 (restoration) from the config: one critic and one generator iteration of
    the config's trainer give d_loss = -d_real + d_fake + 7 gp and g_loss = g_adv + 2 g_identity + 5 g_restoration
    (a swap of the identity and restoration weights, or a weight ignored, breaks an equation)."""
    parser = parser_for(
        tiny_dataset, tmp_path, lambda_gp=7.0, lambda_identity=2.0, lambda_restoration=5.0, iterations=2, val_interval=2
    )
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    out = {k: float(v) for k, v in trainer.state.output.items()}
    assert trainer.state.iteration == 2 and "g_loss" in out  # the second iteration trains the generator
    assert out["g_identity"] != out["g_restoration"]  # else a swap of their weights could not show
    assert out["d_loss"] == pytest.approx(-out["d_real"] + out["d_fake"] + 7.0 * out["gp"], rel=1e-5)
    expected = out["g_adv"] + 2.0 * out["g_identity"] + 5.0 * out["g_restoration"]
    assert out["g_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("ratio, abnormal", [(0.0, 0), (0.5, 4), (0.75, 6)])
def test_anomaly_ratio_sets_the_abnormal_count_of_t_u(tiny_dataset, tmp_path, ratio, abnormal):
    """T_u of 8 images (the tiny set has 8 normal and 12 abnormal unlabeled ones) holds floor(ratio * 8) abnormal
    images, counted in what the trainer reads."""
    parser = parser_for(tiny_dataset, tmp_path, anomaly_ratio=ratio, unlabeled_size=8)
    unlabeled = [os.path.basename(i["image"]) for i in parser.get_parsed_content("train#dataset").unlabeled.items]
    assert len(unlabeled) == 8
    assert sum(name.startswith("unlabeled_1_") for name in unlabeled) == abnormal


def test_no_val_or_test_image_reaches_training(tiny_dataset, tmp_path):
    """T_n is train/0 exactly and T_u comes from train/unlabeled; no val or test image is trained on."""
    parser = parser_for(tiny_dataset, tmp_path)
    dataset = parser.get_parsed_content("train#dataset")
    normal = {os.path.basename(i["image"]) for i in dataset.normal.items}
    unlabeled = {os.path.basename(i["image"]) for i in dataset.unlabeled.items}
    datalist = parser.get_parsed_content("datalist")
    assert normal == {os.path.basename(f) for f in datalist.normal}
    assert all(name.startswith("unlabeled_") for name in unlabeled)
    held = {os.path.basename(f) for split in (datalist.val, datalist.test) for files in split.values() for f in files}
    assert held and not (normal | unlabeled) & held


def test_operating_threshold_is_the_095_quantile_of_distinct_normal_scores(tiny_dataset, tmp_path):
    """The config's operating point on 20 distinct normal scores 0.01..0.20: the 0.95 quantile ("higher") is 0.20;
    at 0.5 it would be 0.11. Sensitivity counts abnormal scores above it."""
    handler = parser_for(tiny_dataset, tmp_path).get_parsed_content("validate#operating_point")
    normal = [round(0.01 * i, 2) for i in range(1, 21)]
    abnormal = [0.05, 0.19, 0.21, 0.5]
    engine = Engine(lambda e, b: None)
    engine.state.output = [
        {"score": s, "label": label, "heatmap": torch.zeros(1, 8, 8)}
        for label, scores in ((0, normal), (1, abnormal))
        for s in scores
    ]
    handler._reset(engine)
    handler._collect(engine)
    handler._choose(engine)
    point = handler.operating_point
    assert point["threshold"] == float(np.quantile(normal, 0.95, method="higher")) == 0.2
    assert point["val_specificity"] == 1.0 and point["val_sensitivity"] == 0.5


def test_attention_gate_output_is_skip_times_psi():
    """ARRM (Eq. 9): the gate returns skip * psi with psi = sigmoid(IN(conv(ReLU(W_g gate + W_x skip)))) in
    (0, 1) and varying over the map, not the skip itself nor a constant gate."""
    torch.manual_seed(0)
    gate = AttentionGate(gate_channels=4, skip_channels=3, inter_channels=2).eval()
    g, x = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        psi = gate.psi(torch.relu(gate.w_gate(g) + gate.w_skip(x)))
        out = gate(g, x)
    assert psi.shape == (2, 1, 8, 8) and 0 < psi.min() and psi.max() < 1 and psi.std() > 0.05
    assert torch.allclose(out, x * psi, atol=1e-6)


def test_resize_keeps_the_whole_image(tiny_dataset, tmp_path):
    """The input is resized to image_size, not cropped: a 128x128 image bright in its first 16 columns becomes a
    64x64 one bright in its first 8 columns (a centre crop would drop them), scaled to [-1, 1]."""
    from PIL import Image

    image = np.zeros((128, 128), np.uint8)
    image[:, :16] = 255
    path = tmp_path / "stripe.png"
    Image.fromarray(image).save(path)
    transform = parser_for(tiny_dataset, tmp_path).get_parsed_content("preprocessing")
    out = torch.as_tensor(transform({"image": str(path)})["image"])
    assert out.shape == (1, 64, 64)
    across = out[0].mean(1)  # along the PNG's width: MONAI's first spatial axis
    assert across[1:7].min() > 0.9 and across[9:].max() < -0.9  # stripe kept, rest dark; blurred at its edges
