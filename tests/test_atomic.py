"""bundle.atomic: a write that fails or is killed midway leaves the previous file whole and no temporary file."""

import os
import stat

import pytest
import torch

from bundle.atomic import PARTIAL_PREFIX, save_torch_atomic, write_atomic, write_text_atomic


def test_write_that_raises_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"auc": 0.9}')
    seen_during_write = []

    def write_half_then_die(f):
        f.write(b'{"auc": 0.')
        f.flush()
        seen_during_write.extend(sorted(os.listdir(tmp_path)))
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(target), write_half_then_die)
    # the half-written content went to a ".partial-*" file beside the target, never into the target itself
    assert len(seen_during_write) == 2 and seen_during_write[0].startswith(PARTIAL_PREFIX)
    assert seen_during_write[0].endswith(".json") and seen_during_write[1] == "metrics.json"
    assert target.read_text() == '{"auc": 0.9}'
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_replaces_the_file_readable_by_others(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old")
    write_text_atomic(str(target), "new\n")
    assert target.read_bytes() == b"new\n" and os.listdir(tmp_path) == ["data.json"]
    assert os.stat(target).st_mode & (stat.S_IRGRP | stat.S_IROTH) == stat.S_IRGRP | stat.S_IROTH
    write_text_atomic(str(tmp_path / "scores.csv"), "a,\udcff\r\n", errors="backslashreplace")
    assert (tmp_path / "scores.csv").read_bytes() == b"a,\\udcff\r\n"  # no newline translation


def test_torch_save_round_trip(tmp_path):
    save_torch_atomic({"weight": torch.ones(2)}, str(tmp_path / "model.pt"))
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], torch.ones(2))
    assert os.listdir(tmp_path) == ["model.pt"]


def test_unwritable_folder_raises_and_changes_nothing(tmp_path):
    with pytest.raises(OSError):
        write_text_atomic(str(tmp_path / "missing" / "data.json"), "x")
    assert os.listdir(tmp_path) == []
