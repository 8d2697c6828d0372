"""The configs as a MONAI user meets them: merges, run ids, bundle properties, YAML overrides, one definition."""

import json
import os

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle.acceleration import FusedInstanceNormAct2d, LayoutAwareInstanceNorm2d, OnePixelConv2d
from bundle.acceleration.winograd import WinogradConv2d
from bundle.engines import epochs_for
from bundle.settings import DEFAULT_SETTINGS
from bundle.transforms import preprocessing

from .conftest import ROOT


def config(*names):
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", n) for n in names])
    return parser


def test_every_mergeable_config_sets_its_own_run():
    assert config("train.json").get("run") == "@training"
    assert config("train.json", "evaluate.json").get("run") == "@evaluating"
    assert config("inference.json").get("run") == "@inferring"
    for preset in os.listdir(os.path.join(ROOT, "configs", "presets")):  # presets never change the workflow
        with open(os.path.join(ROOT, "configs", "presets", preset)) as f:
            assert not {"run", "training", "training#0"} & set(json.load(f))


def test_metadata_found_where_monai_looks_for_it():
    path = os.path.join(ROOT, "configs", "metadata.json")
    assert os.path.realpath(path) == os.path.realpath(os.path.join(ROOT, "metadata.json"))
    meta = json.load(open(path))
    assert meta["version"] in meta["changelog"]


def test_iterations_must_be_a_multiple_of_val_interval():
    assert epochs_for(1200, 50) == 24
    with pytest.raises(ValueError, match=r"iterations \(1234\) must be a positive multiple of val_interval \(50\)"):
        epochs_for(1234, 50)
    with pytest.raises(ValueError, match="1250 or 1200"):
        epochs_for(1234, 50)
    with pytest.raises(ValueError, match="multiple"):
        epochs_for(10, 25)
    assert config("train.json").get_parsed_content("train#trainer#max_epochs", lazy=True) is not None


def test_demo_defaults_are_one_definition():
    """bundle.settings.DEFAULT_SETTINGS (the fallback for models that record nothing) equals train.json's demo."""
    parser = config("train.json")
    net = parser.get("network_def")
    resolved = {
        k: parser.get_parsed_content(v[1:]) if isinstance(v, str) and v.startswith("@") else v for k, v in net.items()
    }
    assert resolved == DEFAULT_SETTINGS["network_def"]
    assert parser.get("image_size") == DEFAULT_SETTINGS["image_size"]


def transform_args(compose) -> list:
    """Each transform of a Compose as (class name, its plain attributes, two levels deep)."""

    def plain(obj, depth=0):
        if isinstance(obj, (str, int, float, bool, type(None))):
            return obj
        if isinstance(obj, (list, tuple)):
            return [plain(v, depth) for v in obj]
        if depth < 2 and hasattr(obj, "__dict__"):
            return (type(obj).__name__, {k: plain(v, depth + 1) for k, v in vars(obj).items() if k != "R"})
        return type(obj).__name__

    return [plain(t) for t in compose.transforms]


@pytest.mark.parametrize("image_size, slice_index", [(64, None), (48, 2)])
def test_inference_preprocessing_is_the_training_preprocessing(image_size, slice_index):
    """train.json's ``preprocessing`` (``bundle.transforms.preprocessing``) builds what inference.json's own block
    builds, plus the last step: training caches decoded tensors without metadata; inference keeps the metadata for
    its writers."""
    train, infer = config("train.json"), config("inference.json")
    for parser in (train, infer):
        parser.update({"image_size": image_size, "slice_index": slice_index})
    train, infer = (transform_args(p.get_parsed_content("preprocessing")) for p in (train, infer))
    assert len(infer) == 3 and train[:-1] == infer
    assert train[-1][0] == "EnsureTyped" and train[-1][1]["converter"][1]["track_meta"] is False
    assert transform_args(preprocessing(image_size, slice_index, keep_metadata=True)) == infer


def test_yaml_override_merges_with_json(tmp_path):
    pytest.importorskip("yaml")
    override = tmp_path / "my.yaml"
    override.write_text("conv_dim: 12\nnum_res_blocks: 2\nlr: 1.0e-4\n")
    parser = config("train.json", str(override))
    assert parser.get_parsed_content("conv_dim") == 12
    assert parser.get_parsed_content("lr") == 1e-4
    assert parser.get_parsed_content("network_def").hparams["conv_dim"] == 12


@pytest.mark.parametrize("workflow_type", ["train", "infer"])
def test_bundle_properties_complete(workflow_type, tiny_dataset, tmp_path):
    files = ["train.json"] if workflow_type == "train" else ["inference.json"]
    override = {"dataset_dir": tiny_dataset if workflow_type == "train" else os.path.join(tiny_dataset, "images")}
    override.update(ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "out"), progress_bar=False)
    if workflow_type == "train":
        override["batch_size"] = 4  # the tiny set has 12 pairs: the default 16 fills no batch, which is refused
    workflow = ConfigWorkflow(
        config_file=[os.path.join(ROOT, "configs", f) for f in files], workflow_type=workflow_type, **override
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    torch.set_grad_enabled(True)


def test_time_limit_stops_cleanly():
    import time

    from ignite.engine import Engine, Events

    from bundle.handlers import TrainingTimeLimit

    engine = Engine(lambda e, b: time.sleep(0.02))
    completed = []
    engine.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    TrainingTimeLimit(max_minutes=0.1 / 60).attach(engine)  # 0.1 s
    engine.run(range(1000), max_epochs=1)
    assert 2 <= engine.state.iteration < 50 and completed == [engine.state.iteration]  # COMPLETED: final checkpoint
    unlimited = Engine(lambda e, b: None)
    TrainingTimeLimit(max_minutes=0).attach(unlimited)
    assert unlimited.run(range(10)).iteration == 10


@pytest.mark.parametrize(
    "selection, patience, stopping",
    [("val_auc", 0, None), ("val_auc", 3, "validate"), ("last", 3, "validate"), ("pseudo_auc", 3, "pseudo")],
)
def test_early_stop_is_wired_and_off_by_default(selection, patience, stopping, tiny_dataset, tmp_path):
    """Off by default; with a patience, the evaluator of the selection metric (val AUC, also for ``last``; the
    pseudo-AUC when selecting on it) stops the trainer."""
    from monai.handlers import EarlyStopHandler

    assert config("train.json").get_parsed_content("early_stop_patience") == 0
    assert config("train.json").get_parsed_content("max_minutes") == 0
    parser = config("train.json")
    parser.update({"dataset_dir": tiny_dataset, "ckpt_dir": str(tmp_path), "output_dir": str(tmp_path / "tb")})
    parser.update({"batch_size": 4, "checkpoint_selection": selection, "early_stop_patience": patience})
    parser["pseudo_holdout"] = 0.0 if selection == "val_auc" else 0.2
    parser["pseudo_holdout_min"] = 2
    for section in ("validate", "pseudo"):
        evaluator = parser.get_parsed_content(f"{section}#evaluator")
        handlers = [e[0] for entries in evaluator._event_handlers.values() for e in entries]
        early = [h for h in handlers if isinstance(h, EarlyStopHandler)]
        assert len(early) == (section == stopping)
        if early:
            assert early[0]._handler.trainer is parser.get_parsed_content("train#trainer")
            assert early[0].patience == patience


def test_train_json_declares_no_speed_switch():
    """The recipe holds no speed keys: the switches have their defaults (off) in Python and the presets turn them on
    where they are used (``generator#...``, ``train#trainer#...``, ``+initialize``)."""
    parser = config("train.json")
    speed = ("share_clean_patches", "channels_last", "fused_adam", "cuda_graphs", "autocast_dtype", "compile_generator")
    assert not [k for k in speed if k in parser.get()]
    assert set(parser.get("generator")) == {"_target_", "network", "device"}
    assert parser.get("initialize") == ["$monai.utils.set_determinism(seed=@seed)"]


@pytest.mark.parametrize("presets", [[], ["presets/fast.json"]])
def test_speed_switches_reach_the_trainer_and_optimisers(presets, tiny_dataset, tmp_path):
    """Off by default; ``presets/fast.json`` turns patch sharing, the channels-last generator (with the layout-aware
    layers), fused Adam, the kept freed memory (in ``initialize``) and, on the CPU, the generator's Winograd
    convolutions on."""
    parser = config("train.json", *presets)
    parser["dataset_dir"] = tiny_dataset
    parser["output_dir"] = parser["ckpt_dir"] = str(tmp_path)
    parser["batch_size"] = 4  # the tiny set's 12 pairs fill no batch of the default 16, which is refused
    trainer = parser.get_parsed_content("train#trainer")
    on = bool(presets)
    assert trainer.share_clean_patches is on
    assert trainer.critic_channels_last is False  # measured slower on the CPU; not in any preset yet
    allocator = "$bundle.environment.keep_freed_cpu_memory(@device.type == 'cpu')"
    assert (allocator in parser.get("initialize")) is on
    assert any(isinstance(m, WinogradConv2d) for m in trainer.g_network.modules()) is on
    assert any(isinstance(m, LayoutAwareInstanceNorm2d) for m in trainer.g_network.modules()) is on
    conv = next(p for p in trainer.g_network.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) is on
    for opt in (trainer.g_optimizer, trainer.d_optimizer):
        assert bool(opt.defaults["fused"]) is on
    # the critic's one-pixel convolutions are on in every preset (place_critic's default)
    assert any(isinstance(m, OnePixelConv2d) for m in trainer.d_network.modules())


@pytest.mark.parametrize("fused", [False, True])
def test_fused_instance_norm_switch_reaches_the_generator(fused, tiny_dataset, tmp_path):
    """``generator#fused_instance_norm`` (off by default) gives the trained generator the fused norm + ReLU layers."""
    parser = config("train.json")
    parser["dataset_dir"] = tiny_dataset
    parser["output_dir"] = parser["ckpt_dir"] = str(tmp_path)
    parser["batch_size"] = 4
    if fused:
        parser["generator#fused_instance_norm"] = True
    g = parser.get_parsed_content("train#trainer").g_network
    assert any(isinstance(m, FusedInstanceNormAct2d) for m in g.modules()) is fused


def test_critic_channels_last_switch_reaches_the_critic(tiny_dataset, tmp_path):
    parser = config("train.json")
    parser["dataset_dir"] = tiny_dataset
    parser["output_dir"] = parser["ckpt_dir"] = str(tmp_path)
    parser["batch_size"] = 4
    parser["discriminator#channels_last"] = True
    trainer = parser.get_parsed_content("train#trainer")
    conv = next(p for p in trainer.d_network.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_gpu_preset_captures_cuda_graphs_on_a_gpu_only():
    """``presets/gpu.json`` turns whole-iteration CUDA graphs and the Triton instance norm on where the device is
    CUDA, off on a CPU (the trainer refuses graphs there; the norm would run unfused); ``multi_gpu_train.json``
    turns the graphs off (DistributedDataParallel)."""
    for device, expected in (("cpu", False), ("cuda", True)):
        parser = config("train.json", "presets/gpu.json")
        parser["device"] = f"$torch.device('{device}')"
        assert parser.get_parsed_content("train#trainer#cuda_graphs") is expected
        assert parser.get_parsed_content("generator#fused_instance_norm") is expected
    parser = config("train.json", "presets/gpu.json", "multi_gpu_train.json")
    assert parser.get_parsed_content("train#trainer#cuda_graphs") is False


@pytest.mark.parametrize("preset", ["presets/fast.json", "presets/gpu.json"])
def test_fast_presets_keep_freed_memory_on_a_cpu_only(preset, monkeypatch):
    import bundle.environment

    for device, expected in (("cpu", True), ("cuda", False)):
        parser = config("train.json", preset)
        parser["device"] = f"$torch.device('{device}')"
        applied = []
        monkeypatch.setattr(bundle.environment, "keep_freed_cpu_memory", applied.append)
        monkeypatch.setattr("monai.utils.set_determinism", lambda seed: None)
        parser.get_parsed_content("initialize")
        assert applied == [expected]
        if preset == "presets/fast.json":  # (gpu.json runs bf16, where the Winograd layers take the convolution)
            assert parser.get_parsed_content("generator#winograd_convolutions") is expected


def test_multi_gpu_config_changes_only_what_multi_gpu_changes():
    """``multi_gpu_train.json`` keeps train.json's run and initialisation and adds to them: the process group and a
    per-rank seed after train.json's ``set_determinism``, the distributed handler attachment in place of the
    single-process one."""
    single, multi = config("train.json"), config("train.json", "multi_gpu_train.json")
    assert multi.get("initialize")[: len(single.get("initialize"))] == single.get("initialize")
    assert multi.get("initialize")[-1] == "$monai.utils.set_determinism(seed=@rank_seed)"
    assert multi.get("training")[1:] == single.get("training")[1:]
    assert multi.get("training")[0].startswith("$bundle.distributed.attach_handlers(")
