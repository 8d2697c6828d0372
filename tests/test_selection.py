"""Checkpoint selection: pseudo-AUC hold-out, val-free training, and the three models of one run."""

import json
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from PIL import Image
from torch import nn

from bundle.data import DatalistError, MedADDatalist
from bundle.selection import (
    BestModelSaver,
    LastModelSaver,
    model_filename,
    pseudo_items,
    spare_normals,
    split_holdout,
    training_sets,
    validation_items,
)
from bundle.settings import read_model

from .conftest import ROOT
from .test_bundle_e2e import EVAL, TRAIN, bundle_run

TINY = ["--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4", "--batch_size", "4", "--val_interval", "2"]
TINY += ["--iterations", "4", "--progress_bar", "False"]


class ZeroNet(nn.Module):
    """A "generator" restoring every image to 0, so that the anomaly score is mean|x| / 2."""

    hparams: dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # the config builds an optimiser for it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def files(prefix, n):
    return [f"/d/images/{prefix}{i}.png" for i in range(n)]


def datalist(n_normal=20, pools=(20, 20), val=True):
    return MedADDatalist(
        root="/d",
        normal=files("n", n_normal),
        unlabeled_normal=files("u0_", pools[0]),
        unlabeled_abnormal=files("u1_", pools[1]),
        val={0: files("v0_", 3), 1: files("v1_", 3)} if val else {},
    )


def test_split_holdout_sizes_seed_and_order():
    items = [f"f{i}" for i in range(50)]
    kept, held = split_holdout(items, 0.1, 3, seed=0)
    assert len(held) == 5 and len(kept) == 45 and sorted(kept + held) == sorted(items)
    assert kept == [f for f in items if f in kept] and held == [f for f in items if f in held]  # input order kept
    assert split_holdout(items, 0.1, 3, seed=0) == (kept, held)
    assert split_holdout(items, 0.1, 3, seed=1)[1] != held
    assert split_holdout(items, 0.1, 3, seed=0, stream=1)[1] != held
    assert len(split_holdout(items, 0.01, 4, seed=0)[1]) == 4  # the minimum
    assert split_holdout(items, 0.0, 4, seed=0) == (items, [])


def test_training_sets_hold_out_from_t_n_and_t_u():
    data = datalist()
    sets = training_sets(data, 0.5, None, 0, "random", "val_auc", 0.2, 2)
    assert len(sets.held_normal) == 4 and len(sets.normal) == 16
    assert len(sets.held_unlabeled) == 4 and len(sets.unlabeled) == 16  # T_u = |T_n| = 20 drawn first
    assert not set(sets.held_normal) & set(sets.normal) and not set(sets.held_unlabeled) & set(sets.unlabeled)
    assert set(sets.held_normal + sets.normal) == set(data.normal)
    items = pseudo_items(sets)
    assert [i["label"] for i in items] == [0] * 4 + [1] * 4
    assert [i["image"] for i in items] == sets.held_normal + sets.held_unlabeled
    # val_auc without a hold-out: today's T_n and T_u
    plain = training_sets(data, 0.5, None, 0, "random", "val_auc", 0.0, 2)
    assert plain.normal == data.normal and not plain.has_holdout and pseudo_items(plain) == []


def test_spare_normals_are_the_normal_training_images_not_trained_on():
    data = datalist()
    sets = training_sets(data, 0.5, None, 0, "random", "val_auc", 0.2, 2)
    spare = spare_normals(data, sets)
    trained = set(sets.normal) | set(sets.unlabeled)
    assert not set(spare) & trained and not set(spare) & set(sets.held_unlabeled)
    drawn_normals = [f for f in sets.unlabeled + sets.held_unlabeled if f in data.unlabeled_normal]
    assert len(drawn_normals) == 10  # T_u = 20 at ratio 0.5, drawn before the hold-out
    assert spare == sets.held_normal + [f for f in data.unlabeled_normal if f not in drawn_normals]
    assert len(spare) == 4 + 10


def test_selection_errors_are_clear():
    with pytest.raises(ValueError, match="checkpoint_selection must be one of"):
        training_sets(datalist(), checkpoint_selection="best")
    with pytest.raises(DatalistError, match="no 'val' split.*--checkpoint_selection pseudo_auc"):
        training_sets(datalist(val=False))
    with pytest.raises(DatalistError, match="no 'val' split.*--checkpoint_selection pseudo_auc"):
        validation_items(datalist(val=False))
    assert validation_items(datalist(val=False), "pseudo_auc") == []
    with pytest.raises(DatalistError, match="pseudo_holdout is 0"):
        training_sets(datalist(val=False), checkpoint_selection="pseudo_auc", holdout_fraction=0.0)
    with pytest.raises(DatalistError, match="no unlabeled training images"):
        training_sets(datalist(), unlabeled_size=0, checkpoint_selection="pseudo_auc", holdout_fraction=0.1)
    with pytest.raises(DatalistError, match="'last' needs labelled 'val' images or a pseudo-AUC hold-out"):
        training_sets(datalist(val=False), checkpoint_selection="last", holdout_fraction=0.0)
    with pytest.raises(DatalistError, match="leaves 1 normal"):
        training_sets(datalist(n_normal=4), checkpoint_selection="pseudo_auc", holdout_fraction=0.1, holdout_min=3)


def test_model_filenames():
    assert [model_filename(c, "val_auc") for c in ("val_auc", "pseudo_auc", "last")] == [
        "model.pt",
        "model_pseudo_auc.pt",
        "model_last.pt",
    ]
    assert model_filename("val_auc", "pseudo_auc") == "model_val_auc.pt"
    assert model_filename("last", "last") == "model.pt"


@pytest.fixture(scope="module")
def constant_dataset(tmp_path_factory):
    """Constant-intensity images without a val split: with ZeroNet the score of an image of grey level g is
    (2 g / 255 - 1) / 2, so that the pseudo-AUC can be counted by hand."""
    root = tmp_path_factory.mktemp("constant")
    (root / "images").mkdir()
    levels = {}
    groups = {
        "n": [140, 150, 160, 170, 180, 150, 160, 170, 140, 200],  # T_n
        "u0_": [150, 160, 170, 180, 190, 200],  # unlabeled pool, "normal"
        "u1_": [170, 190, 200, 210, 220, 230, 240, 250],  # unlabeled pool, "abnormal"
    }
    for prefix, values in groups.items():
        for i, v in enumerate(values):
            name = f"{prefix}{i}.png"
            Image.fromarray(np.full((20, 24), v, np.uint8)).save(root / "images" / name)
            levels[str(root / "images" / name)] = v
    data = {
        "train": {
            "0": [f"n{i}.png" for i in range(10)],
            "unlabeled": {"0": [f"u0_{i}.png" for i in range(6)], "1": [f"u1_{i}.png" for i in range(8)]},
        },
        "test": {"0": ["n0.png"], "1": ["u1_0.png"]},
    }
    (root / "data.json").write_text(json.dumps(data))
    return str(root), levels


def hand_auc(negatives, positives):
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_pseudo_auc_and_threshold_by_hand(constant_dataset, tmp_path):
    """The config's pseudo-AUC evaluator, without val: its metric is the hand-counted AUC of held-out unlabeled
    (positive) vs held-out normal scores, its threshold the 0.95 quantile of the held-out normal scores."""
    root, levels = constant_dataset
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.update(
        {
            "dataset_dir": root,
            "ckpt_dir": str(tmp_path / "models"),
            "output_dir": str(tmp_path / "tb"),
            "checkpoint_selection": "pseudo_auc",
            "pseudo_holdout": 0.4,
            "pseudo_holdout_min": 2,
            "network_def": {"_target_": "tests.test_selection.ZeroNet"},
            "d_conv_dim": 4,
            "batch_size": 4,  # the default 16 fills no batch from this small set, which the trainer refuses
            "device": "$torch.device('cpu')",
        }
    )
    sets = parser.get_parsed_content("training_sets")
    assert len(sets.held_normal) == 4 and len(sets.held_unlabeled) == 4
    # what the trainer reads: no held-out image
    dataset = parser.get_parsed_content("train#dataset")
    trained = {i["image"] for i in dataset.normal.items} | {i["image"] for i in dataset.unlabeled.items}
    assert trained == set(sets.normal + sets.unlabeled)
    assert not trained & set(sets.held_normal + sets.held_unlabeled)
    assert len(parser.get_parsed_content("validate#dataset")) == 0  # no val: nothing to validate on
    handlers = parser.get_parsed_content("train#handlers")
    validators = [h.validator for h in handlers if type(h).__name__ == "ValidationHandler"]
    assert validators == [parser.get_parsed_content("pseudo#evaluator")]  # the val one is disabled

    evaluator = parser.get_parsed_content("pseudo#evaluator")
    evaluator.run()
    score = {f: (2 * v / 255 - 1) / 2 for f, v in levels.items()}
    normal = [score[f] for f in sets.held_normal]
    unlabeled = [score[f] for f in sets.held_unlabeled]
    expected = hand_auc(normal, unlabeled)
    assert 0 < expected < 1  # not a trivial case
    assert evaluator.state.metrics["val_pseudo_auc"] == pytest.approx(expected, abs=1e-6)
    assert "val_sensitivity" not in evaluator.state.metrics  # label 1 means "unlabeled" here
    settings = parser.get_parsed_content("pseudo#operating_point").state_dict()
    assert settings["threshold"] == pytest.approx(np.quantile(normal, 0.95, method="higher"), abs=1e-6)
    assert settings["threshold_source"] == "held-out normal training images"
    saved = read_model(str(tmp_path / "models" / "model.pt"))[1]  # pseudo_auc: the best is model.pt
    assert saved["val_pseudo_auc"] == pytest.approx(expected, abs=1e-6)
    assert saved["selected_by"] == "val_pseudo_auc"


class Settings:
    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"threshold": float(self.value)}


class Evaluator(Engine):
    """Runs one empty pass per ``run(global_epoch)``, as MONAI's evaluators are called."""

    def __init__(self):
        super().__init__(lambda e, b: None)

    def run(self, global_epoch=1):
        return super().run([0])


def test_last_model_saver_validates_a_generator_stopped_between_validations(tmp_path):
    net, settings = nn.Linear(2, 2), Settings()
    evaluator = Evaluator()
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(settings, "value", trainer.state.iteration))
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=4), lambda e: evaluator.run())
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    LastModelSaver(str(tmp_path), "model_last.pt", net, settings, evaluator).attach(trainer)
    trainer.run(range(8), max_epochs=1)
    state, saved = read_model(str(tmp_path / "model_last.pt"))
    assert saved == {"threshold": 6.0, "iteration": 6, "selected_by": "last"}  # validated at 6
    assert torch.equal(state["weight"], net.weight)
    runs = []
    evaluator.add_event_handler(Events.STARTED, lambda e: runs.append(trainer.state.iteration))
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=4), lambda e: evaluator.run())
    LastModelSaver(str(tmp_path), "model_last.pt", net, settings, evaluator).attach(trainer)
    trainer.run(range(8), max_epochs=1)
    assert runs == [4, 8]  # validated at the final iteration already: no extra pass
    assert read_model(str(tmp_path / "model_last.pt"))[1]["iteration"] == 8


def test_best_model_saver_keeps_the_best_and_resumes(tmp_path):
    net, settings = nn.Linear(2, 2), Settings()
    evaluator = Engine(lambda e, b: None)
    values = iter((0.6, 0.8, 0.7, float("nan")))
    evaluator.add_event_handler(Events.EPOCH_STARTED, lambda e: e.state.metrics.update(m=next(values)))
    BestModelSaver(str(tmp_path), "model_pseudo_auc.pt", net, settings, metric_name="m").attach(evaluator)
    for weight in (1.0, 2.0, 3.0, 4.0):
        nn.init.constant_(net.weight, weight)
        evaluator.run([0])
    state, saved = read_model(str(tmp_path / "model_pseudo_auc.pt"))
    assert saved["m"] == 0.8 and float(state["weight"][0, 0]) == 2.0
    assert BestModelSaver(str(tmp_path), "model_pseudo_auc.pt", net, settings, metric_name="m", resume=True).best == 0.8
    assert BestModelSaver(str(tmp_path), "model_pseudo_auc.pt", net, settings, metric_name="m").best == -np.inf


@pytest.fixture(scope="module")
def three_models(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    log = bundle_run(
        "training",
        *TRAIN,
        "--dataset_dir",
        tiny_dataset,
        "--ckpt_dir",
        str(out / "models"),
        "--output_dir",
        str(out / "tb"),
        "--pseudo_holdout",
        "0.2",
        "--pseudo_holdout_min",
        "2",
        *TINY,
    )
    return out, log


def test_one_run_keeps_val_pseudo_and_last_models(three_models, tiny_dataset):
    out, log = three_models
    assert "pseudo-AUC hold-out: 2 of 12 normal and 2 of 12 unlabeled images" in log
    assert sorted(f for f in os.listdir(out / "models") if f.startswith("model")) == [
        "model.pt",
        "model_last.pt",
        "model_pseudo_auc.pt",
    ]
    names = ("model.pt", "model_pseudo_auc.pt", "model_last.pt")
    settings = {f: read_model(str(out / "models" / f))[1] for f in names}
    assert "val_specificity" in settings["model.pt"]  # val_auc: the val operating point, as before
    assert settings["model_pseudo_auc.pt"]["threshold_source"] == "held-out normal training images"
    assert settings["model_last.pt"]["iteration"] == 4 and "val_specificity" in settings["model_last.pt"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "tb")).Reload().Tags()["scalars"]
    assert {"val_auc", "val_pseudo_auc"} <= set(scalars)
    for name in names:
        eval_dir = out / f"eval_{name[:-3]}"
        result = bundle_run(
            "evaluating",
            *EVAL,
            "--dataset_dir",
            tiny_dataset,
            "--model_path",
            str(out / "models" / name),
            "--eval_dir",
            str(eval_dir),
        )
        assert "RESULT auc" in result
        metrics = json.load(open(eval_dir / "metrics.json"))
        assert metrics["checkpoint"].endswith(name) and metrics["threshold"] == settings[name]["threshold"]


def test_training_without_val_selects_by_pseudo_auc(tiny_dataset, tmp_path):
    root = tmp_path / "noval"
    root.mkdir()
    os.symlink(os.path.join(tiny_dataset, "images"), root / "images")
    data = json.load(open(os.path.join(tiny_dataset, "data.json")))
    del data["val"]
    (root / "data.json").write_text(json.dumps(data))
    models = tmp_path / "models"
    common = ["--dataset_dir", str(root), "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "tb"), *TINY]
    log = bundle_run("training", *TRAIN, *common, "--checkpoint_selection", "pseudo_auc", "--pseudo_holdout_min", "2")
    assert "val_pseudo_auc" in log and "val_auc" not in log.replace("val_pseudo_auc", "")
    assert sorted(f for f in os.listdir(models) if f.startswith("model")) == ["model.pt", "model_last.pt"]
    settings = read_model(str(models / "model.pt"))[1]
    assert settings["selected_by"] == "val_pseudo_auc" and 0 < settings["threshold"] < 1
    assert settings["threshold_source"] == "held-out normal training images"


def test_calibration_pools_the_stored_and_the_spare_normal_scores(three_models, tiny_dataset, tmp_path, monkeypatch):
    """``scripts/calibrate_threshold.py``: the new threshold is the 0.95 quantile of the stored val normal scores and
    the spare normals' scores together; weights, pixel threshold and in-domain check are kept."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate", os.path.join(ROOT, "scripts", "calibrate_threshold.py"))
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    out, _ = three_models
    model = str(out / "models" / "model.pt")
    state, settings = read_model(model)
    scored = []

    def fake_scores(model_path, files):  # distinct known scores, larger than every stored one
        scored.extend(files)
        return np.max(settings["normal_scores"]) + 1.0 + np.arange(len(files), dtype=float)

    monkeypatch.setattr(calibrate, "anomaly_scores", fake_scores)
    target = str(tmp_path / "calibrated.pt")
    args = ["--model", model, "--out", target, "--dataset_dir", tiny_dataset, "--pseudo_holdout", "0.2"]
    args += ["--pseudo_holdout_min", "2"]
    calibrate.main(args + ["--seed", "0"])
    new_state, new = read_model(target)
    assert len(scored) == 2 + 3  # the 2 held-out normals and the 3 unlabeled normals not drawn into T_u
    added = np.max(settings["normal_scores"]) + 1.0 + np.arange(5, dtype=float)
    pooled = np.concatenate([settings["normal_scores"], added])
    assert new["threshold_normals"] == len(pooled) == settings["threshold_normals"] + 5
    assert new["threshold"] == float(np.quantile(pooled, 0.95, method="higher"))
    assert new["threshold_rank"] == int(np.ceil(0.95 * (len(pooled) - 1))) + 1
    assert new["normal_scores"] == sorted(pooled.tolist())
    assert new["threshold_calibration"]["previous_threshold"] == settings["threshold"]
    assert new["pixel_threshold"] == settings["pixel_threshold"] and new["domain"] == settings["domain"]
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    # the real scores: the model's own inference on the spare images
    monkeypatch.undo()
    real = str(tmp_path / "real.pt")
    calibrate.main(["--model", model, "--out", real, *args[4:]])
    assert read_model(real)[1]["threshold_normals"] == settings["threshold_normals"] + 5
