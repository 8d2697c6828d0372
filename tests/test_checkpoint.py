import os

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers import AtomicCheckpointSaver, latest_checkpoint, resume_checkpoint


def engine_with_metric(values):
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def set_metric(e):
        e.state.metrics["val_auc"] = values[e.state.epoch - 1]

    return engine


def test_best_model_replaced_atomically_and_survives_a_kill(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    engine = engine_with_metric([0.5, 0.7, 0.9])
    AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_auc", key_metric_filename="model.pt"
    ).attach(engine)
    calls = {"n": 0}
    real_save = torch.save

    def save_then_die(obj, f, *a, **k):  # the second save is "killed" half-way through writing
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_die)
    net.weight.data.fill_(1.0)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=3)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(state["weight"], torch.ones(1, 2))  # the first (last good) checkpoint is intact
    assert oct(os.stat(tmp_path / "model.pt").st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # only the temporary file is gone, nothing else


def test_best_model_kept_when_metric_improves(tmp_path):
    net = torch.nn.Linear(2, 1)
    engine = engine_with_metric([0.5, 0.9, 0.6])

    @engine.on(Events.EPOCH_STARTED)
    def change(e):
        net.weight.data.fill_(float(e.state.epoch))

    AtomicCheckpointSaver(
        str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="val_auc", key_metric_filename="model.pt"
    ).attach(engine)
    engine.run([0], max_epochs=3)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], torch.full((1, 2), 2.0))


def test_latest_and_resume_checkpoint(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    assert resume_checkpoint(str(tmp_path), False) is None
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resume_checkpoint(str(tmp_path), True)
    for i, name in enumerate(["checkpoint_epoch=1.pt", "checkpoint_final.pt"]):
        torch.save({"trainer": {}, "critic_stall": {}}, tmp_path / name)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    (tmp_path / "model.pt").write_bytes(b"x")
    assert resume_checkpoint(str(tmp_path), True).endswith("checkpoint_final.pt")
    torch.save({"trainer": {}, "best_model_saver": {"_saved": []}}, tmp_path / "checkpoint_final.pt")  # bundle 0.7
    with pytest.raises(ValueError, match="written by bundle <= 0.7"):
        resume_checkpoint(str(tmp_path), True)
    (tmp_path / "checkpoint_final.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="checkpoint_final.pt: not a readable training checkpoint"):
        resume_checkpoint(str(tmp_path), True)


def test_best_score_survives_resume(tmp_path):
    net = torch.nn.Linear(2, 1)
    kwargs = dict(save_key_metric=True, key_metric_name="val_auc", key_metric_filename="model.pt")
    first = AtomicCheckpointSaver(str(tmp_path), {"model": net}, **kwargs)
    net.weight.data.fill_(1.0)
    engine = engine_with_metric([0.9])
    first.attach(engine)
    engine.run([0], max_epochs=1)
    state = first.state_dict()
    resumed = AtomicCheckpointSaver(str(tmp_path), {"model": net}, **kwargs)
    resumed.load_state_dict(state)
    net.weight.data.fill_(2.0)
    later = engine_with_metric([0.5])
    resumed.attach(later)
    later.run([0], max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], torch.ones(1, 2))
