# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints under faults: a full disk or a read-only folder during a write, and untrusted (pickled code)
checkpoint files at every place the bundle loads one."""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from bundle.handlers import AtomicCheckpointSaver, GeneratorLoader, latest_checkpoint
from bundle.networks import SAGANGenerator
from bundle.settings import load_model_settings


def training_like_engine(tmp_path, net):
    """Saves checkpoint_epoch=K.pt every epoch (2 kept) and checkpoint_final.pt, as configs/train.json does."""
    engine = Engine(lambda e, b: net.weight.data.add_(1.0))
    AtomicCheckpointSaver(
        str(tmp_path),
        {"net": net, "trainer": engine},
        file_prefix="",
        save_interval=1,
        n_saved=2,
        save_final=True,
        final_filename="checkpoint_final.pt",
    ).attach(engine)
    return engine


def fail_writes_from(monkeypatch, n_ok: int, error: OSError, partial: bool = True):
    """torch.save writes ``n_ok`` files, then every write puts some bytes down and raises ``error``."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real_save(obj, f, *args, **kwargs)
        if partial and hasattr(f, "write"):
            f.write(b"PK\x03\x04 half a zip")
        elif partial:  # a path: a non-atomic save writes the target itself
            with open(f, "wb") as target:
                target.write(b"PK\x03\x04 half a zip")
        raise error

    monkeypatch.setattr(torch, "save", save)


def assert_previous_is_latest_and_loads(tmp_path, iteration: int):
    latest = latest_checkpoint(str(tmp_path))
    assert latest is not None and os.path.basename(latest) == f"checkpoint_epoch={iteration}.pt"
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == iteration
    for name in os.listdir(tmp_path):  # nothing partial left: every file there loads
        torch.load(os.path.join(tmp_path, name), weights_only=True)


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    engine = training_like_engine(tmp_path, net)
    fail_writes_from(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OSError) as info:
        engine.run([0], max_epochs=4)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # ignite rotates the oldest checkpoint out before it writes the new one: after a failed write, n_saved - 1 are left
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_epoch=2.pt"]
    assert_previous_is_latest_and_loads(tmp_path, 2)


def test_disk_full_message_names_the_checkpoint(tmp_path, monkeypatch):
    engine = training_like_engine(tmp_path, torch.nn.Linear(2, 1))
    fail_writes_from(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    # the write that fails first is checkpoint_epoch=2.pt; MONAI then tries checkpoint_final.pt, which fails too
    message = (
        r"cannot write checkpoint .*checkpoint_(epoch=2|final)\.pt: No space left on device; the previous checkpoint"
    )
    with pytest.raises(OSError, match=message):
        engine.run([0], max_epochs=3)


def test_partial_file_left_by_a_kill_is_never_latest(tmp_path):
    """A kill -9 inside a write leaves the temporary file (ignite's tmpXXXXXXXX, or .partial-*.pt) behind, newer
    than every checkpoint: the newest *checkpoint* must still be the one resumed from."""
    net = torch.nn.Linear(2, 1)
    training_like_engine(tmp_path, net).run([0], max_epochs=2)
    for name in ("tmpk1ll3d9x", ".partial-k1ll3d.pt", "checkpoint_epoch=3.pt.tmp"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a zip")
        os.utime(tmp_path / name, (2e9, 2e9))
    latest = latest_checkpoint(str(tmp_path))
    assert os.path.basename(latest) == "checkpoint_final.pt"
    assert torch.load(latest, weights_only=True)["trainer"]["iteration"] == 2


def make_read_only(monkeypatch, folder):
    """A read-only folder: chmod where that binds (not root); else creating a file there fails with EROFS."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return
    real = tempfile.NamedTemporaryFile
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(str(dir), "tmpXXXXXX"))
        return real(*args, dir=dir, **kwargs)

    def refuse_mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(str(dir), "tmpXXXXXX"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse_mkstemp)


def test_read_only_checkpoint_folder(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    engine = training_like_engine(tmp_path, net)
    engine.run([0], max_epochs=1)
    before = sorted(os.listdir(tmp_path))
    make_read_only(monkeypatch, tmp_path)
    later = training_like_engine(tmp_path, net)
    try:
        with pytest.raises(OSError) as info:
            later.run([0], max_epochs=2)
    finally:
        os.chmod(tmp_path, 0o755)
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert sorted(os.listdir(tmp_path)) == before  # nothing new, nothing partial
    assert torch.load(latest_checkpoint(str(tmp_path)), weights_only=True)["trainer"]["iteration"] == 1


# ------------------------------------------------------------------ untrusted checkpoints


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do with worse commands."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def evil(tmp_path):
    marker = str(tmp_path / "payload_ran")
    g = SAGANGenerator(conv_dim=4, num_res_blocks=1)
    path = str(tmp_path / "model.pt")
    torch.save({"model": g.state_dict(), "settings": {"image_size": 64}, "extra": Payload(marker)}, path)
    return path, marker, g


def test_plain_torch_load_refuses_pickled_code(evil):
    path, marker, _ = evil
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not os.path.exists(marker)


def test_model_settings_refuse_pickled_code(evil):
    path, marker, _ = evil
    with pytest.raises(ValueError, match=r"model\.pt: not a readable model checkpoint .*Weights only load failed"):
        load_model_settings(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("loader", ["GeneratorLoader", "CheckpointLoader (resume)"])
def test_engine_loaders_refuse_pickled_code(evil, loader):
    path, marker, g = evil
    engine = Engine(lambda e, b: None)
    if loader == "GeneratorLoader":
        GeneratorLoader(path, g).attach(engine)
    else:
        CheckpointLoader(path, {"generator": g}).attach(engine)
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.run([0], max_epochs=1)
    assert not os.path.exists(marker)


def test_every_checkpoint_the_bundle_writes_loads_with_weights_only(tmp_path):
    """The counterpart: nothing the bundle saves needs unpickling of code (so weights_only=True costs nothing)."""
    net = torch.nn.Linear(2, 1)
    engine = training_like_engine(tmp_path, net)

    @engine.on(Events.COMPLETED)
    def check(_):
        for name in os.listdir(tmp_path):
            torch.load(os.path.join(tmp_path, name), weights_only=True)

    engine.run([0], max_epochs=2)
