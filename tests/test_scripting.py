# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""TorchScript: every network scripts and the scripted module computes what the eager one does (eval mode)."""

from __future__ import annotations

import io
import itertools

import pytest
import torch

from bundle.networks import BrainomalyGenerator, SAGANCritic, SAGANGenerator


def assert_scripted_matches(net: torch.nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    net.eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        eager, script = net(x), scripted(x)
    assert script.shape == eager.shape
    assert (script - eager).abs().max().item() <= 1e-5
    return scripted


def image(batch: int, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize(
    "conv_dim, num_res_blocks, batch", [(8, 3, 2), (16, 3, 2), (64, 6, 1)], ids=["demo", "cpu", "paper"]
)
def test_generator_presets_script(conv_dim, num_res_blocks, batch):
    torch.manual_seed(0)
    assert_scripted_matches(SAGANGenerator(conv_dim=conv_dim, num_res_blocks=num_res_blocks), image(batch))


@pytest.mark.parametrize(
    "patches_per_side, position_code, attention_gates", list(itertools.product((1, 2), (True, False), (True, False)))
)
def test_generator_switches_script(patches_per_side, position_code, attention_gates):
    torch.manual_seed(0)
    g = SAGANGenerator(
        conv_dim=4,
        num_res_blocks=1,
        patches_per_side=patches_per_side,
        position_code=position_code,
        attention_gates=attention_gates,
    )
    assert_scripted_matches(g, image(2, 32))


@pytest.mark.parametrize("conv_dim, num_layers", [(64, 6), (16, 6), (4, 4)], ids=["paper", "cpu", "tiny"])
def test_critic_scripts(conv_dim, num_layers):
    torch.manual_seed(0)
    assert_scripted_matches(SAGANCritic(conv_dim=conv_dim, num_layers=num_layers), image(2))


@pytest.mark.parametrize("conv_dim, num_res_blocks", [(64, 6), (8, 3)], ids=["published", "demo"])
def test_brainomaly_scripts(conv_dim, num_res_blocks):
    torch.manual_seed(0)
    assert_scripted_matches(BrainomalyGenerator(conv_dim=conv_dim, num_res_blocks=num_res_blocks), image(2))


def test_scripted_keeps_hparams_and_round_trips():
    torch.manual_seed(0)
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1)
    scripted = assert_scripted_matches(g, image(1, 32))
    assert scripted.hparams == g.hparams  # ignored by TorchScript, still readable on the scripted module
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # what `monai.bundle ckpt_export` does
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        assert torch.equal(loaded(image(1, 32)), scripted(image(1, 32)))
