# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Multi-process training (configs/multi_gpu_train.json): two CPU processes with gloo under torchrun on a tiny
generated set, the DDP gradient penalty, and the sharding helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader, LrScheduleHandler, StatsHandler, ValidationHandler

from bundle.distributed import DistributedPassSampler, handlers_for_this_rank, rank_seed
from bundle.handlers import OperatingPointHandler
from bundle.settings import generator_from_settings, read_model
from bundle.transforms import AnomalyScored

from .conftest import ROOT

CONFIGS = "['configs/train.json','configs/multi_gpu_train.json','{extra}']"
TINY = [
    "--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4",
    "--val_interval", "2", "--progress_bar", "False", "--log_interval", "1",
]  # fmt: skip


def torchrun_training(extra_config: str, *args: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m monai.bundle run training`` from the bundle root (gloo)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even where a GPU exists: two ranks may not share one GPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "monai.bundle", "run", "training", "--config_file", CONFIGS.format(extra=extra_config), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert " - ERROR - " not in log, log[-6000:]
    return log


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def recording_config(path, record_dir, probe_gradient_penalty: bool = False, share_clean_patches: bool = False) -> str:
    """A config merged last: records each rank's sampler passes, served items (index, donor) and final weights;
    optionally checks the gradient penalty through the DDP critic first, and runs the generator on patches."""
    extra = {
        "train#trainer#share_clean_patches": share_clean_patches,
        "train#sampler#_target_": "tests.distributed_helpers.RecordingSampler",
        "train#sampler#record_dir": str(record_dir),
        "train#dataset#_target_": "tests.distributed_helpers.RecordingDataset",
        "train#dataset#record_dir": str(record_dir),
        "+train#handlers": [
            {
                "_target_": "tests.distributed_helpers.ParameterDump",
                "networks": {"generator": "@generator", "discriminator": "@discriminator"},
                "record_dir": str(record_dir),
            }
        ],
    }
    if probe_gradient_penalty:
        probe = {"_target_": "tests.distributed_helpers.GradientPenaltyProbe", "ddp_critic": "@ddp_discriminator"}
        extra["+train#handlers"].append({**probe, "record_dir": str(record_dir), "image_size": "@image_size"})
    with open(path, "w") as f:
        json.dump(extra, f)
    return str(path)


@pytest.fixture(scope="module")
def two_process_run(tiny_dataset, tmp_path_factory):
    """4 iterations on 2 ranks, then ``--resume`` to 6: 12 pairs -> 6 per rank and pass -> 1 batch of 4 per pass.
    The first run has ``share_clean_patches`` on (the generator on patches through its DDP wrapper), the resumed
    one off (whole images), so that both paths end with identical parameters on the ranks."""
    out = tmp_path_factory.mktemp("ddp")
    common = [*TINY, "--dataset_dir", tiny_dataset, "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "tb")]
    first, resumed = out / "first", out / "resumed"
    first.mkdir()
    resumed.mkdir()
    config = recording_config(out / "record_first.json", first, True, share_clean_patches=True)
    log = torchrun_training(config, *common, "--iterations", "4")
    assert "cannot run on patches" not in log
    first_files = sorted(os.listdir(out / "models")), os.listdir(out / "tb")
    torchrun_training(
        recording_config(out / "record_resumed.json", resumed), *common, "--iterations", "6", "--resume", "True"
    )
    return out, first, resumed, first_files


def test_ranks_draw_disjoint_pairs_reshuffled_every_pass(two_process_run):
    _, first, _, _ = two_process_run
    passes = [read_jsonl(first / f"sampler_rank{r}.jsonl") for r in (0, 1)]
    assert len(passes[0]) == len(passes[1]) >= 4  # one pass per iteration (1 batch per pass), 2 per engine epoch
    for p0, p1 in zip(*passes):
        assert p0["pass"] == p1["pass"]
        assert len(p0["indices"]) == len(p1["indices"]) == 6
        assert not set(p0["indices"]) & set(p1["indices"]), "two ranks drew the same pair in one pass"
        assert set(p0["indices"]) | set(p1["indices"]) == set(range(12))
    assert [p["pass"] for p in passes[0]] == list(range(len(passes[0])))
    orders = [tuple(p["indices"]) for p in passes[0]]
    assert len(set(orders)) == len(orders), "a pass repeated the previous permutation (no set_epoch per pass)"
    for r in (0, 1):  # the loader served exactly the first batch of every pass, in order
        served = [item["index"] for item in read_jsonl(first / f"items_rank{r}.jsonl")]
        assert served == [i for p in passes[r][:4] for i in p["indices"][:4]]


def test_ranks_draw_independent_donors(two_process_run):
    _, first, _, _ = two_process_run
    offsets = []
    for r in (0, 1):
        items = read_jsonl(first / f"items_rank{r}.jsonl")
        assert all(item["donor"] != item["index"] % 12 for item in items)
        offsets.append([(item["donor"] - item["index"] - 1) % 12 for item in items])  # the random part of the draw
    assert offsets[0] != offsets[1], "both ranks drew the same donor sequence: the data sets share one seed"


def test_ranks_end_with_identical_parameters(two_process_run):
    _, first, resumed, _ = two_process_run
    for record, iteration in ((first, 4), (resumed, 6)):
        p0, p1 = (torch.load(record / f"params_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert p0["iteration"] == p1["iteration"] == iteration
        for net in ("generator", "discriminator"):
            assert p0[net].keys() == p1[net].keys()
            for name in p0[net]:
                assert torch.equal(p0[net][name], p1[net][name]), f"{net}.{name} differs between the ranks"


def test_rank_zero_writes_and_checkpoints_load_into_plain_networks(two_process_run):
    out, _, _, (first_models, first_tensorboard) = two_process_run
    assert {"checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt", "checkpoint_final.pt", "model.pt"} <= set(first_models)
    assert not [f for f in first_models if not f.endswith(".pt")]  # no temporary file left by two writers
    assert len(first_tensorboard) == 1  # one TensorBoard event file: rank 0's
    state, settings = read_model(str(out / "models" / "model.pt"))
    assert not [k for k in state if k.startswith("module.")]
    assert settings["network_def"]["conv_dim"] == 4
    generator = generator_from_settings(settings)
    generator.load_state_dict(state, strict=True)
    full = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert full["trainer"]["iteration"] == 6
    for net in ("generator", "discriminator"):
        assert not [k for k in full[net] if k.startswith("module.")]


def test_operating_point_is_that_of_the_whole_val_split(two_process_run, tiny_dataset):
    """The thresholds in model.pt (val sharded over 2 ranks, gathered) equal one process's on the whole split."""
    out = two_process_run[0]
    state, settings = read_model(str(out / "models" / "model.pt"))
    generator = generator_from_settings(settings)
    generator.load_state_dict(state)
    generator.eval()
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser["dataset_dir"] = tiny_dataset
    val = parser.get_parsed_content("validate#dataset")
    single = OperatingPointHandler(generator, image_size=64)
    engine = Engine(lambda e, b: None)
    with torch.no_grad():
        engine.state.output = [
            {
                **AnomalyScored()({"image": item["image"], "pred": generator(item["image"][None])[0]}),
                "label": item["label"],
            }
            for item in val
        ]
    single._collect(engine)
    single._choose(engine)
    for key in ("threshold", "pixel_threshold", "val_sensitivity", "val_specificity"):
        assert settings[key] == pytest.approx(single.operating_point[key], rel=1e-4), key


def test_resume_continues_at_the_pass_of_its_iteration(two_process_run):
    _, _, resumed, _ = two_process_run
    passes = [read_jsonl(resumed / f"sampler_rank{r}.jsonl") for r in (0, 1)]
    assert passes[0][0]["pass"] == passes[1][0]["pass"] == 4  # iteration 4, one batch per pass
    for p0, p1 in zip(*passes):
        assert not set(p0["indices"]) & set(p1["indices"])


def test_gradient_penalty_through_the_ddp_critic_is_all_reduced(two_process_run):
    _, first, _, _ = two_process_run
    for r in (0, 1):
        with open(first / f"gp_rank{r}.json") as f:
            result = json.load(f)
        assert result["reference_vs_local"] > 1e-3  # the ranks' gradients differ: the check can tell
        assert result["ddp"]["vs_reference"] < 1e-5
        assert result["ddp_gp_unwrapped"]["vs_reference"] < 1e-5
        assert result["unwrapped_only"]["vs_local"] < 1e-6  # bypassing DDP entirely: no all-reduce at all


def test_pass_sampler_shards_and_reshuffles_without_a_process_group():
    data = list(range(10))
    shards = [DistributedPassSampler(data, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for _ in range(2):
        drawn = [list(s) for s in shards]
        assert all(len(d) == 3 for d in drawn)
        assert len(set().union(*map(set, drawn))) == 9  # disjoint, the 10th (10 mod 3) dropped
    again = DistributedPassSampler(data, seed=3, num_replicas=3, rank=0)
    assert list(again) != list(again)  # a new permutation at each pass
    with pytest.raises(ValueError, match="fewer than one batch"):
        DistributedPassSampler(data, batch_size=4, num_replicas=3, rank=0)


def test_pass_sampler_resumes_at_the_pass_of_the_iteration():
    data = list(range(8))
    sampler = DistributedPassSampler(data, seed=0, num_replicas=2, rank=0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, drop_last=True)  # 2 batches a pass
    engine = Engine(lambda e, b: None)
    sampler.attach(engine)
    engine.state.iteration = 7
    engine.data_loader = loader
    engine.fire_event(Events.STARTED)
    assert sampler.passes == 3
    fresh = DistributedPassSampler(data, seed=0, num_replicas=2, rank=0)
    for _ in range(3):
        list(fresh)
    assert list(sampler) == list(fresh)


def test_rank_seeds_and_handler_gating(monkeypatch):
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8 and all(0 <= rank_seed(7, r) < 2**31 for r in range(8))
    handlers = [
        CheckpointLoader(load_path="x.pt", load_dict={"net": torch.nn.Linear(1, 1)}),
        StatsHandler(),
        ValidationHandler(interval=1),
        LrScheduleHandler(lr_scheduler=None),
        None,
    ]
    assert handlers_for_this_rank(handlers) == handlers[:4]
    marked = type("Writer", (), {"rank_zero_only": True})()
    monkeypatch.setattr("bundle.distributed.get_rank", lambda: 1)
    assert handlers_for_this_rank([*handlers, marked]) == [handlers[0], handlers[2], handlers[3]]
