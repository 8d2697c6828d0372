"""scripts/benchmark_quality.py: one row per run with exactly the issue's columns, metrics read from the runs'
metrics.json, and the ``command`` column reproduces the row (same machine, same seed)."""

import csv
import importlib.util
import json
import os
import shlex
import subprocess
import sys

from bundle.environment import UNKNOWN_COMMIT, source_commit

from .conftest import ROOT

spec = importlib.util.spec_from_file_location(
    "benchmark_quality", os.path.join(ROOT, "scripts", "benchmark_quality.py")
)
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

COLUMNS = "dataset,variant,preset,seed,anomaly_ratio,val_auc,test_auc,test_ap,train_minutes,iterations,command"


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_row_reproduces_from_its_command(tiny_dataset, tmp_path):
    data_root, name = os.path.split(tiny_dataset)
    first = tmp_path / "first" / "results.csv"
    args = ["--data_root", data_root, "--datasets", name, "--preset", "demo", "--seeds", "0"]
    schedule = ["--iterations", "4", "--val_interval", "2", "--batch_size", "4"]  # the tiny set has 12 pairs
    benchmark.main(args + schedule + ["--out_root", str(tmp_path / "runs1"), "--csv", str(first)])
    with open(first) as f:
        assert f.readline().strip() == COLUMNS
    (row,) = read(first)
    run_dir = tmp_path / "runs1" / name / "sagan" / "demo" / "seed0"
    for split, column in (("val", "val_auc"), ("test", "test_auc")):
        metrics = json.loads((run_dir / f"eval_{split}" / "metrics.json").read_text())
        assert round(metrics["auc"], 4) == float(row[column])
    assert row["iterations"] == "4" and row["variant"] == "sagan" and " ".join(schedule) in row["command"]
    (run,) = [json.loads(line) for line in open(first.parent / "results_runs.jsonl")]
    assert run["command"] == row["command"] and run["commit"] == source_commit(ROOT)  # "unknown" in an archive copy

    second = tmp_path / "second" / "results.csv"
    command = shlex.split(row["command"])
    assert command[:2] == ["python", "scripts/benchmark_quality.py"]
    subprocess.run([sys.executable, *command[1:], "--out_root", str(tmp_path / "runs2"), "--csv", str(second)],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    (again,) = read(second)
    for column in COLUMNS.split(","):
        if column != "train_minutes":
            assert again[column] == row[column], column

    selection = {r["selection"]: r for r in read(first.parent / "results_selection.csv")}
    assert set(selection) == {"val_auc", "last"}  # no pseudo-AUC hold-out in this variant
    assert selection["val_auc"]["test_auc"] == row["test_auc"]
    assert (run_dir / "eval_test_model_last" / "metrics.json").is_file()

    md = tmp_path / "results.md"
    benchmark.report(str(first), str(md))
    text = md.read_text()
    schedule = " ".join(schedule)  # runs of other schedules or machines are never averaged together
    assert f"#### {name}" in text and f"| sagan | demo | {schedule} | 0 | " in text
    by_val, last = float(selection["val_auc"]["test_auc"]), float(selection["last"]["test_auc"])
    assert f"| sagan | demo | {schedule} | 0 | {by_val:.3f} | - | {last:.3f} |" in text


def test_report_counts_a_rerun_seed_once(tmp_path):
    """A rerun of a seed (same command) replaces its earlier row in the mean, instead of voting twice."""
    csv_path, md = tmp_path / "results.csv", tmp_path / "results.md"
    rows = [("0", "0.5"), ("0", "0.9"), ("1", "0.7")]  # seed 0 rerun: 0.9 replaces 0.5
    with open(csv_path, "w") as f:
        f.write(COLUMNS + "\n")
        for seed, auc in rows:
            command = f"python scripts/benchmark_quality.py --datasets d --variants sagan --preset cpu --seeds {seed}"
            f.write(f"d,sagan,cpu,{seed},0.6,{auc},{auc},{auc},1.0,1200,{command}\n")
    with open(tmp_path / "results_selection.csv", "w") as f:
        f.write("dataset,variant,preset,seed,selection,test_auc,test_ap,command\n")
        for seed, auc in rows:
            command = f"python scripts/benchmark_quality.py --datasets d --variants sagan --preset cpu --seeds {seed}"
            f.write(f"d,sagan,cpu,{seed},val_auc,{auc},{auc},{command}\n")
    benchmark.report(str(csv_path), str(md))
    text = md.read_text()
    assert "| sagan | cpu | - | 0,1 | 0.800 ± 0.141 | 0.800 ± 0.141 |" in text
    assert "| sagan | cpu | - | 0,1 | 0.800 ± 0.141 | - | - |" in text  # the selection table, likewise


def test_commit_is_recorded_in_a_git_checkout_and_unknown_elsewhere(tmp_path):
    """A run records its commit; in a copy of the files without .git (a release archive, a zoo download), or one
    that sits inside another repository, it records "unknown" instead of failing or naming the wrong commit."""
    assert source_commit(str(tmp_path)) == UNKNOWN_COMMIT
    repo = tmp_path / "repo"
    (repo / "copy").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert source_commit(str(repo)) == head
    (repo / "f.txt").write_text("2")
    assert source_commit(str(repo)) == f"{head}-dirty"
    assert source_commit(str(repo / "copy")) == UNKNOWN_COMMIT  # an archive unpacked inside another checkout
