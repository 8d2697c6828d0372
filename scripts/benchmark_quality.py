# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Quality benchmark: train and evaluate variants x seeds x data sets with the bundle's own configs.

    python scripts/benchmark_quality.py --data_root ../shared/data --datasets kermany_pneumonia \\
        --variants sagan baseline --seeds 0 1 2 --preset cpu

Each run trains with ``python -m monai.bundle run training`` (checkpoint chosen on ``val``), evaluates the chosen
model on ``val`` and on ``test`` with ``run evaluating``, reads both ``metrics.json`` files and appends one row to
``docs/results.csv``:

    dataset,variant,preset,seed,anomaly_ratio,val_auc,test_auc,test_ap,train_minutes,iterations,command

(``command`` reproduces the row). The machine of each row (CPU model, GPU, threads) goes to
``docs/results_runs.jsonl`` beside it. ``--references`` adds the trivial references (AUC of the mean intensity, of
the intensity spread, of the L1 distance to the mean normal training image) computed on the same splits, and
``--report`` rewrites the generated tables of ``docs/results.md`` (between its ``<!-- results.csv -->`` markers).

Checkpoint choice: besides ``model.pt`` (chosen by ``checkpoint_selection``, val AUC by default) a run saves the last
generator (``model_last.pt``) and, with a pseudo-AUC hold-out (variant ``sagan_pseudo``), the pseudo-AUC choice
(``model_pseudo_auc.pt``). Each of them is scored on ``test`` and appended to ``docs/results_selection.csv``
(``dataset,variant,preset,seed,selection,test_auc,test_ap,command``); ``--selection_only`` does that for runs
already in ``--out_root`` without training.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bundle.environment import machine_info, source_commit  # noqa: E402

COLUMNS = [
    "dataset",
    "variant",
    "preset",
    "seed",
    "anomaly_ratio",
    "val_auc",
    "test_auc",
    "test_ap",
    "train_minutes",
    "iterations",
    "command",
]
# variant -> (extra config files, overrides); the paper's ablations (Tables 3 and 4)
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "sagan": ([], {}),
    "baseline": (["configs/presets/brainomaly.json"], {}),  # Brainomaly's generator, the paper's Table 3 baseline
    "acm": ([], {"attention_gates": "False"}),
    "arrm": ([], {"patches_per_side": "1", "position_code": "False"}),
    "sagan_no_acm_no_arrm": ([], {"patches_per_side": "1", "position_code": "False", "attention_gates": "False"}),
    "no_unlabeled": ([], {"unlabeled_size": "0"}),
    **{f"ar{r}": ([], {"anomaly_ratio": r}) for r in ("0", "0.2", "0.4", "0.8")},
    "sagan_fast": (["configs/presets/fast.json"], {}),  # not an ablation: SAGAN with the speed switches
    "sagan_gpu": (["configs/presets/gpu.json"], {}),  # the speed switches and bf16 autocast (GPU; CPUs with bf16)
    "sagan_fast_compiled": (
        ["configs/presets/fast.json"],
        {"train#trainer#compile_generator": "True"},
    ),  # + torch.compile of G
    # the generator's 3x3 convolutions on 4x4 maps by Winograd's F(4x4, 3x3) (fast.json turns it on on a CPU)
    "sagan_fast_winograd": (["configs/presets/fast.json"], {"generator#winograd_convolutions": "True"}),
    # gpu.json with whole iterations as CUDA graphs forced on (gpu.json turns them on by itself on a CUDA device)
    "sagan_gpu_graphs": (["configs/presets/gpu.json"], {"train#trainer#cuda_graphs": "True"}),
    # ... and the generator's instance norms + ReLUs as Triton kernels
    "sagan_gpu_graphs_fused": (
        ["configs/presets/gpu.json"],
        {"train#trainer#cuda_graphs": "True", "generator#fused_instance_norm": "True"},
    ),
    # ... and a channels-last critic with cuDNN's autotuned algorithms (H200: 12.0 -> 11.4 ms per iteration)
    "sagan_gpu_graphs_fused_clcritic_autotuned": (
        ["configs/presets/gpu.json", "configs/presets/cudnn_autotuned.json"],
        {
            "train#trainer#cuda_graphs": "True",
            "generator#fused_instance_norm": "True",
            "discriminator#channels_last": "True",
            "train#trainer#critic_channels_last": "True",
        },
    ),
    # the cpu preset's recipe since 0.9.0 (He-normal critic init, critic restart on a stall, 2400 iterations, 30-minute
    # cap) with the speed switches: the README's CPU command. Rows of `sagan`/`sagan_fast` with preset cpu from before
    # 0.9.0 used the published critic init (the commit of each row is in results_runs.jsonl).
    "recipe": (["configs/presets/fast.json"], {}),
    # the same schedule with the published critic init and no restart: the "before" arm of the recipe
    "recipe_published_init": (["configs/presets/fast.json"], {"d_init": "default", "critic_restart_on_stall": "False"}),
    # the recipe at 128x128 (4x the pixels of the presets' 64x64; an iteration costs about 4x)
    "recipe_128": (["configs/presets/fast.json"], {"image_size": "128"}),
    # Brainomaly's generator (the paper's baseline) on the recipe's schedule and speed switches
    "baseline_fast": (["configs/presets/brainomaly.json", "configs/presets/fast.json"], {}),
    "sagan_code_after_norm": ([], {"position_code_after_norm": "True"}),  # deviation: the code not cancelled by IN
    "sagan_pseudo": ([], {"pseudo_holdout": "0.1"}),  # 10% of T_n and T_u held out for the label-free choice
}
SELECTIONS = ("val_auc", "pseudo_auc", "last")
SELECTION_COLUMNS = ["dataset", "variant", "preset", "seed", "selection", "test_auc", "test_ap", "command"]
MARK_BEGIN, MARK_END = "<!-- results.csv: begin (generated by scripts/benchmark_quality.py --report) -->", (
    "<!-- results.csv: end -->"
)


def bundle_run(args: list[str], log_path: str) -> None:
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=ROOT, stdout=log, stderr=log)
    if proc.returncode:
        raise RuntimeError(f"`monai.bundle run {' '.join(args[:1])}` failed (exit {proc.returncode}); see {log_path}")


def run_dir_of(out_root: str, dataset: str, variant: str, preset: str, seed: int) -> str:
    return os.path.join(out_root, dataset, variant, preset, f"seed{seed}")


def command_of(data_root: str, dataset: str, variant: str, preset: str, seed: int, schedule: dict | None) -> str:
    command = (
        f"python scripts/benchmark_quality.py --data_root {shlex.quote(data_root)} --datasets {dataset} "
        f"--variants {variant} --preset {preset} --seeds {seed}"
    )
    return command + "".join(f" --{k} {v}" for k, v in (schedule or {}).items())


def evaluate(data_root: str, dataset: str, run_dir: str, split: str, model_file: str = "model.pt") -> dict:
    """``run evaluating`` of one saved generator on one split; its metrics.json."""
    models = os.path.join(run_dir, "models")
    name = os.path.splitext(model_file)[0]
    eval_dir = os.path.join(run_dir, f"eval_{split}" if model_file == "model.pt" else f"eval_{split}_{name}")
    bundle_run(
        ["evaluating", "--config_file", str(["configs/train.json", "configs/evaluate.json"]),
         "--dataset_dir", os.path.join(data_root, dataset), "--ckpt_dir", models,
         "--model_path", os.path.join(models, model_file), "--eval_split", split, "--eval_dir", eval_dir],
        os.path.join(run_dir, "log.txt"),
    )  # fmt: skip
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        return json.load(f)


def selection_rows(
    data_root: str, dataset: str, variant: str, preset: str, seed: int, out_root: str, schedule: dict | None = None
) -> list[dict]:
    """Test AUC / AP of every generator a finished run saved: ``model.pt`` (the benchmark's runs choose it by val
    AUC, the default; its test metrics are read from the row's evaluation), ``model_last.pt``, ``model_pseudo_auc.pt``.
    """
    run_dir = run_dir_of(out_root, dataset, variant, preset, seed)
    models = os.path.join(run_dir, "models")
    if not os.path.isfile(os.path.join(models, "model.pt")):
        print(f"no finished run in {run_dir}: nothing to score", file=sys.stderr)
        return []
    rows = []
    for criterion in SELECTIONS:
        model_file = "model.pt" if criterion == "val_auc" else f"model_{criterion}.pt"
        if not os.path.isfile(os.path.join(models, model_file)):
            continue
        done = os.path.join(run_dir, "eval_test", "metrics.json")
        if model_file == "model.pt" and os.path.isfile(done):
            with open(done) as f:
                test = json.load(f)
        else:
            test = evaluate(data_root, dataset, run_dir, "test", model_file)
        rows.append(
            {
                "dataset": dataset,
                "variant": variant,
                "preset": preset,
                "seed": seed,
                "selection": criterion,
                "test_auc": round(test["auc"], 4),
                "test_ap": round(test["ap"], 4),
                "command": command_of(data_root, dataset, variant, preset, seed, schedule),
            }
        )
    return rows


def iterations_done(run_dir: str) -> int:
    """Iterations a run trained (fewer than configured when ``max_minutes`` stopped it), from the trainer state of
    its final checkpoint."""
    final = os.path.join(run_dir, "models", "checkpoint_final.pt")
    import torch

    return int(torch.load(final, map_location="cpu", weights_only=False)["trainer"]["iteration"])


def train_and_evaluate(
    data_root: str, dataset: str, variant: str, preset: str, seed: int, out_root: str, schedule: dict | None = None
) -> dict:
    """One row: train, then evaluate the val-chosen model on val and test; metrics from metrics.json files.
    ``schedule``: ``iterations`` / ``val_interval`` overrides of the preset (short runs, tests)."""
    files, variant_overrides = VARIANTS[variant]
    overrides = {**variant_overrides, **(schedule or {})}
    config = ["configs/train.json"] + ([f"configs/presets/{preset}.json"] if preset != "demo" else []) + files
    run_dir = run_dir_of(out_root, dataset, variant, preset, seed)
    os.makedirs(run_dir, exist_ok=True)
    log_path = os.path.join(run_dir, "log.txt")
    common = ["--dataset_dir", os.path.join(data_root, dataset), "--ckpt_dir", os.path.join(run_dir, "models")]
    flags = [x for k, v in overrides.items() for x in (f"--{k}", v)]
    start = time.perf_counter()
    bundle_run(
        ["training", "--config_file", str(config), *common, "--output_dir", os.path.join(run_dir, "tb"),
         "--seed", str(seed), "--progress_bar", "False", *flags],
        log_path,
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    metrics = {split: evaluate(data_root, dataset, run_dir, split) for split in ("val", "test")}
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, c) for c in config])
    parser.update({k: v for k, v in overrides.items()})
    command = command_of(data_root, dataset, variant, preset, seed, schedule)
    return {
        "dataset": dataset,
        "variant": variant,
        "preset": preset,
        "seed": seed,
        "anomaly_ratio": float(overrides.get("anomaly_ratio", parser.get("anomaly_ratio"))),
        "val_auc": round(metrics["val"]["auc"], 4),
        "test_auc": round(metrics["test"]["auc"], 4),
        "test_ap": round(metrics["test"]["ap"], 4),
        "train_minutes": round(minutes, 1),
        "iterations": iterations_done(run_dir),
        "command": command,
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with ties counted half (Mann-Whitney U)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def reference_rows(data_root: str, dataset: str) -> list[dict]:  # data_root relative to the repository
    """Trivial references on the same val and test splits: mean intensity, intensity spread, L1 to the mean normal
    training image, at the model's input (64x64, [-1, 1], the bundle's own preprocessing). The better sign is taken
    on val (e.g. lower mean intensity may mean abnormal) and applied to test."""
    sys.path.insert(0, ROOT)
    from monai.bundle import ConfigParser

    from bundle.data import labelled_items, load_medad_datalist

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    preprocess = parser.get_parsed_content("preprocessing")
    datalist = load_medad_datalist(os.path.join(ROOT, data_root, dataset))

    def load(items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([np.asarray(preprocess({"image": it["image"]})["image"]) for it in items])
        return images, np.array([it.get("label", 0) for it in items])

    mean_normal = load([{"image": f} for f in datalist.normal])[0].mean(0)
    statistics = {
        "ref_mean_intensity": lambda x: x.mean(axis=(1, 2, 3)),
        "ref_intensity_spread": lambda x: x.std(axis=(1, 2, 3)),
        "ref_l1_to_mean_normal": lambda x: np.abs(x - mean_normal).mean(axis=(1, 2, 3)),
    }
    splits = {s: load(labelled_items(datalist, s)) for s in ("val", "test")}
    rows = []
    for name, statistic in statistics.items():
        sign = 1.0 if auc(statistic(splits["val"][0]), splits["val"][1]) >= 0.5 else -1.0
        val_auc = auc(sign * statistic(splits["val"][0]), splits["val"][1])
        test_scores, test_labels = sign * statistic(splits["test"][0]), splits["test"][1]
        rows.append(
            {
                "dataset": dataset, "variant": name, "preset": "none", "seed": "", "anomaly_ratio": "",
                "val_auc": round(val_auc, 4), "test_auc": round(auc(test_scores, test_labels), 4), "test_ap": "",
                "train_minutes": 0, "iterations": 0,
                "command": f"python scripts/benchmark_quality.py --data_root {data_root} --datasets {dataset} "
                "--references --variants --csv docs/results.csv",
            }
        )  # fmt: skip
    return rows


def git_commit() -> str:
    """The repository's commit (``-dirty`` with uncommitted changes), ``"unknown"`` outside a git checkout."""
    return source_commit(ROOT)


def append_rows(
    csv_path: str, rows: list[dict], columns: list[str] = COLUMNS, log_machine: bool = True, commit: str | None = None
) -> None:
    """Appends ``rows`` (with a header for a new file) and, with ``log_machine``, each row's machine and the
    ``commit`` its run used to ``<csv>_runs.jsonl``."""
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    new = not os.path.isfile(csv_path)
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    if not log_machine:
        return
    with open(os.path.splitext(csv_path)[0] + "_runs.jsonl", "a") as f:
        for row in rows:
            entry = {"command": row["command"], "date": time.strftime("%Y-%m-%d"), **machine_info(), "commit": commit}
            f.write(json.dumps(entry) + "\n")


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def schedule_of(row: dict) -> str:
    """The options of a row's command after its seed (``--iterations 2400 --val_interval 50``...), '' for none."""
    return row["command"].split(f"--seeds {row['seed']}", 1)[-1].strip() if row["seed"] else ""


def selection_table(selection_csv: str, dataset: str, machines: dict[str, str] | None = None) -> list[str]:
    """Test AUC of the generator each criterion chose, mean +- sd per (variant, preset, schedule, machine), from
    results_selection.csv; ``machines``: command -> machine, from results_runs.jsonl."""
    if not os.path.isfile(selection_csv):
        return []
    with open(selection_csv) as f:
        # a rerun of a seed (same command) replaces its earlier rows, as in the main table
        latest = {(r["command"], r["selection"]): r for r in csv.DictReader(f) if r["dataset"] == dataset}
    rows = list(latest.values())
    if not rows:
        return []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        machine = (machines or {}).get(row["command"], "?")
        groups[(row["variant"], row["preset"], schedule_of(row), machine)].append(row)
    lines = [
        "Test AUC of the generator chosen by each criterion (`docs/results_selection.csv`):",
        "",
        "| variant | preset | schedule | seeds | by val AUC | by pseudo-AUC (no labels) | last | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (variant, preset, schedule, machine), group in sorted(groups.items()):
        seeds = ",".join(sorted({r["seed"] for r in group}, key=int))
        by = {c: mean_sd([float(r["test_auc"]) for r in group if r["selection"] == c]) for c in SELECTIONS}
        lines.append(
            f"| {variant} | {preset} | {schedule or '-'} | {seeds} | {by['val_auc']} | {by['pseudo_auc']} | "
            f"{by['last']} | {machine} |"
        )
    return lines + [""]


def report(csv_path: str, md_path: str) -> None:
    """Mean +- sd per (dataset, variant, preset, schedule, machine) into docs/results.md between the markers (the
    latest row of each seed), and per data set the test AUC of each checkpoint choice."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    machines = {}
    runs_path = os.path.splitext(csv_path)[0] + "_runs.jsonl"
    if os.path.isfile(runs_path):
        for line in open(runs_path):
            entry = json.loads(line)
            machines[entry["command"]] = entry["gpu"] or entry["cpu"]
    groups: dict[tuple, dict] = defaultdict(dict)
    for i, row in enumerate(rows):  # runs on other machines or schedules are never averaged together
        machine = machines.get(row["command"], "?")
        # a rerun of a seed (same command) replaces its earlier row: one vote per seed
        groups[(row["dataset"], row["variant"], row["preset"], schedule_of(row), machine)][row["seed"] or i] = row
    lines = [MARK_BEGIN, ""]
    for dataset in sorted({k[0] for k in groups}):
        lines += [
            f"#### {dataset}",
            "",
            "| variant | preset | schedule | seeds | val AUC | test AUC | test AP | iterations | min/run | machine |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for (d, variant, preset, schedule, machine), by_seed in sorted(groups.items()):
            if d != dataset:
                continue
            group = list(by_seed.values())

            def stat(key: str, group: list[dict] = group) -> str:
                return mean_sd([float(r[key]) for r in group if r[key] not in ("", None)])

            seeds = ",".join(sorted((r["seed"] for r in group if r["seed"]), key=int)) or "-"
            iterations = ",".join(sorted({r["iterations"] for r in group if r["iterations"]})) or "-"
            lines.append(
                f"| {variant} | {preset} | {schedule or '-'} | {seeds} | {stat('val_auc')} | {stat('test_auc')} | "
                f"{stat('test_ap')} | {iterations} | {stat('train_minutes')} | {machine} |"
            )
        lines.append("")
        lines += selection_table(os.path.join(os.path.dirname(csv_path), "results_selection.csv"), dataset, machines)
    lines.append(MARK_END)
    text = open(md_path).read() if os.path.isfile(md_path) else ""
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(MARK_END, 1)[1]
    else:
        text += "\n" + "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--datasets", nargs="+", default=["kermany_pneumonia"])
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=sorted(VARIANTS),
        help="variants to train (default: sagan; none when --report or --references is given alone)",
    )
    parser.add_argument("--preset", default="cpu", choices=["demo", "cpu", "paper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out_root", default=os.path.join(ROOT, "runs", "benchmark"))
    parser.add_argument("--csv", default=os.path.join(ROOT, "docs", "results.csv"))
    parser.add_argument("--references", action="store_true", help="add the trivial reference rows")
    parser.add_argument("--report", action="store_true", help="regenerate the tables of docs/results.md")
    parser.add_argument(
        "--selection_only", action="store_true", help="score the saved generators of finished runs, no training"
    )
    parser.add_argument("--iterations", type=int, help="override the preset's iterations (recorded in the command)")
    parser.add_argument("--val_interval", type=int, help="override the preset's val_interval (with --iterations)")
    parser.add_argument("--max_minutes", type=float, help="wall-clock budget of each training run (recorded)")
    parser.add_argument("--num_workers", type=int, help="data loader workers (recorded; GPU runs)")
    parser.add_argument("--batch_size", type=int, help="override the preset's batch size (recorded; tiny data sets)")
    parser.add_argument(
        "--unlabeled_size", type=int, help="|T_u| (recorded; a set whose unlabeled pool cannot give |T_n| at the ratio)"
    )
    args = parser.parse_args(argv)
    if args.variants is None:  # --report / --references alone: tables and reference rows, no training
        args.variants = [] if (args.report or args.references) else ["sagan"]
    schedule = {
        k: str(getattr(args, k))
        for k in ("iterations", "val_interval", "max_minutes", "num_workers", "batch_size", "unlabeled_size")
        if getattr(args, k) is not None
    }
    selection_csv = os.path.join(os.path.dirname(args.csv), "results_selection.csv")
    data_root = os.path.relpath(os.path.abspath(args.data_root), ROOT)
    for dataset in args.datasets:
        if args.references:
            append_rows(args.csv, reference_rows(data_root, dataset), commit=git_commit())
        for variant in args.variants:
            for seed in args.seeds:
                if not args.selection_only:
                    commit = git_commit()  # before the run starts: the code it uses
                    row = train_and_evaluate(data_root, dataset, variant, args.preset, seed, args.out_root, schedule)
                    append_rows(args.csv, [row], commit=commit)
                    print(json.dumps(row), flush=True)
                rows = selection_rows(data_root, dataset, variant, args.preset, seed, args.out_root, schedule)
                if args.selection_only and os.path.isfile(selection_csv):  # scored again: no duplicate rows
                    with open(selection_csv) as f:
                        done = {(r["command"], r["selection"]) for r in csv.DictReader(f)}
                    rows = [r for r in rows if (r["command"], r["selection"]) not in done]
                append_rows(selection_csv, rows, SELECTION_COLUMNS, log_machine=False)
                print("\n".join(json.dumps(r) for r in rows), flush=True)
    if args.report:
        report(args.csv, os.path.join(ROOT, "docs", "results.md"))


if __name__ == "__main__":
    main()
