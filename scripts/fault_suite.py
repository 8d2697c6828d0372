# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Fault suite: kill -9 during training (and inside checkpoint writes), bad inputs in bulk, checkpoint faults,
determinism. Prints markdown tables and, with ``--write-docs``, puts them into ``docs/reliability.md``.

    python scripts/fault_suite.py --kills 24 --write-docs     # the full run behind docs/reliability.md
    python scripts/fault_suite.py --quick --kills 3           # CI: light inputs, 3 kills, exits 1 on a failure

The kill loop trains the tiny demo set with ``python -m monai.bundle run training`` and kills the run with SIGKILL,
alternately at a uniformly random moment (start-up, training, validation or saving) and inside a checkpoint write
(``tests/faults/slow_save/sitecustomize.py`` spreads each ``torch.save`` over ``--slow_save`` seconds and announces
it, so the kill lands between the first and the last byte). After every kill the newest checkpoint must load with
``torch.load(weights_only=True)`` and ``--resume True`` must continue; the final state is compared with an
uninterrupted run of the same length and seed. Exit status 1 when a checkpoint is unreadable, a resume fails, a bad
input crashes or is taken silently, or a checkpoint-fault test fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY_SIZES = {"train": (12, 0), "unlabeled": (8, 12), "val": (6, 6), "test": (6, 6)}
SHIM = os.path.join(ROOT, "tests", "faults", "slow_save")


# --------------------------------------------------------------------------------------------- bundle runs


def train_args(data: str, run_dir: str, iterations: int, seed: int, resume: bool) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "configs/train.json", "--meta_file", "metadata.json",
        "--dataset_dir", data, "--conv_dim", "4", "--num_res_blocks", "1", "--d_conv_dim", "4",
        "--batch_size", "4", "--val_interval", "2", "--iterations", str(iterations), "--seed", str(seed),
        "--ckpt_dir", os.path.join(run_dir, "models"), "--output_dir", os.path.join(run_dir, "tb"),
        "--progress_bar", "False", "--log_interval", "1000", "--image_log_interval", "1000",
        "--resume", str(bool(resume)),
    ]  # fmt: skip


def eval_args(data: str, run_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", "['configs/train.json','configs/evaluate.json']", "--meta_file", "metadata.json",
        "--dataset_dir", data, "--ckpt_dir", os.path.join(run_dir, "models"),
        "--eval_dir", os.path.join(run_dir, "eval"), "--conv_dim", "4", "--num_res_blocks", "1",
    ]  # fmt: skip


class Child:
    """A bundle run whose stderr is watched for the slow-save markers (and kept, with stdout, in ``log``)."""

    def __init__(self, args: list[str], log: str, slow_save: float | None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slow_save:
            env["SAGAN_FAULT_SLOW_SAVE"] = str(slow_save)
            env["PYTHONPATH"] = os.pathsep.join([SHIM, ROOT, env.get("PYTHONPATH", "")])
        self.started = time.monotonic()
        self.log = open(log, "a")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.PIPE, text=True)
        self.begins = 0
        self.ends = 0
        self.begin_times: list[float] = []
        self.in_write = False
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.write(line)
            with self.cond:
                if line.startswith("FAULT_SAVE_BEGIN"):
                    self.begins += 1
                    self.begin_times.append(time.monotonic() - self.started)
                    self.in_write = True
                elif line.startswith("FAULT_SAVE_END"):
                    self.ends += 1
                    self.in_write = False
                self.cond.notify_all()

    def wait_for_begin(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.begins >= n or self.proc.poll() is not None, timeout) and (
                self.begins >= n
            )

    def wait_for_end(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.ends >= n or self.proc.poll() is not None, timeout) and (
                self.ends >= n
            )

    def kill(self) -> tuple[bool, float]:
        """SIGKILL now; returns (whether a checkpoint write was under way, seconds since start)."""
        with self.cond:
            in_write = self.in_write
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.reader.join(5)
        self.log.close()
        return in_write, time.monotonic() - self.started

    def finish(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        self.log.close()
        return rc


def run_to_end(args: list[str], log: str, slow_save: float | None = None) -> tuple[int, float]:
    rc, seconds, _ = run_timed(args, log, slow_save)
    return rc, seconds


def run_timed(args: list[str], log: str, slow_save: float | None = None) -> tuple[int, float, list[float]]:
    """Exit status, wall time and the start times of its checkpoint writes (with ``slow_save``)."""
    child = Child(args, log, slow_save)
    rc = child.finish()
    return rc, time.monotonic() - child.started, child.begin_times


# --------------------------------------------------------------------------------------------- checks


def inspect_checkpoints(ckpt_dir: str) -> dict:
    """The newest checkpoint (``bundle.handlers.latest_checkpoint``) and whether it and model.pt load safely."""
    import torch

    from bundle.handlers import latest_checkpoint

    out = {"latest": None, "iteration": None, "loads": True, "error": "", "partial_files": 0, "model_loads": None}
    if not os.path.isdir(ckpt_dir):
        return out
    names = os.listdir(ckpt_dir)
    out["partial_files"] = sum(n.startswith(("tmp", ".partial")) for n in names)
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        out["latest"] = os.path.basename(latest)
        try:
            out["iteration"] = int(torch.load(latest, map_location="cpu", weights_only=True)["trainer"]["iteration"])
        except Exception as e:  # an unreadable newest checkpoint is exactly the failure this suite looks for
            out["loads"], out["error"] = False, f"{type(e).__name__}: {str(e)[:200]}"
    if "model.pt" in names:
        try:
            torch.load(os.path.join(ckpt_dir, "model.pt"), map_location="cpu", weights_only=True)
            out["model_loads"] = True
        except Exception as e:
            out["model_loads"], out["error"] = False, f"model.pt: {type(e).__name__}: {str(e)[:200]}"
    return out


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def compare_checkpoints(a_path: str, b_path: str) -> dict[str, dict]:
    """Per top-level entry: tensors compared (bitwise equal?, max |a - b|) and plain values."""
    import torch

    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    report = {}
    for key in sorted(set(a) | set(b)):
        fa, fb = flatten(a.get(key, {})), flatten(b.get(key, {}))
        equal, max_diff, differing = True, 0.0, []
        for name in sorted(set(fa) | set(fb)):
            va, vb = fa.get(name), fb.get(name)
            if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
                same = va.shape == vb.shape and torch.equal(va, vb)
                if not same and va.shape == vb.shape and va.is_floating_point():
                    max_diff = max(max_diff, float((va.double() - vb.double()).abs().max()))
            else:
                same = va == vb
            if not same:
                equal = False
                differing.append(name)
        report[key] = {"equal": equal, "max_abs_diff": max_diff, "differing": differing[:6], "n": len(fa)}
    return report


def eval_metrics(data: str, run_dir: str, logs: str) -> dict:
    rc, _ = run_to_end(eval_args(data, run_dir), os.path.join(logs, f"eval_{os.path.basename(run_dir)}.log"))
    if rc != 0:
        return {"error": f"evaluation exit {rc}"}
    return json.load(open(os.path.join(run_dir, "eval", "metrics.json")))


# --------------------------------------------------------------------------------------------- kill loop


def reference_run(work: str, data: str, iterations: int, seed: int, slow: float) -> dict:
    """The uninterrupted run (once per work folder): its wall time and the start times of its checkpoint writes."""
    logs, ref = os.path.join(work, "logs"), os.path.join(work, "reference")
    os.makedirs(logs, exist_ok=True)
    timing = os.path.join(ref, "timing.json")
    if os.path.isfile(timing):
        return json.load(open(timing))
    args = train_args(data, ref, iterations, seed, False)
    rc, seconds, begins = run_timed(args, os.path.join(logs, "reference.log"), slow)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted reference run failed (exit {rc}); see {logs}/reference.log")
    out = {"seconds": seconds, "begins": begins}
    with open(timing, "w") as f:
        json.dump(out, f)
    return out


def kill_loop(work: str, data: str, kills: int, iterations: int, seed: int, slow: float, rng: random.Random) -> dict:
    logs = os.path.join(work, "logs")
    ref = os.path.join(work, "reference")
    timing = reference_run(work, data, iterations, seed, slow)
    ref_seconds, begins = timing["seconds"], timing["begins"]
    # a kill at a uniformly random moment from the start to about two epochs after the first checkpoint write:
    # start-up, training, validation and writes alike, and a resumed run progresses about one epoch on average
    epoch = (begins[-1] - begins[0]) / max(1, iterations // 2 - 1) if len(begins) > 1 else ref_seconds / 10
    horizon = (begins[0] if begins else ref_seconds / 3) + 2 * epoch
    killed = os.path.join(work, "killed")
    rows, failures = [], []
    for k in range(kills):
        before = inspect_checkpoints(os.path.join(killed, "models"))
        resume = before["latest"] is not None
        log = os.path.join(logs, f"killed_{k:02d}.log")
        child = Child(train_args(data, killed, iterations, seed, resume), log, slow)
        mode = "in write" if k % 2 else "random"
        landed = True
        if mode == "random":
            delay = rng.uniform(0.5, horizon)
            try:
                child.proc.wait(delay)
            except subprocess.TimeoutExpired:
                pass
        else:
            nth = rng.choice([2, 3, 4])  # the nth write of this run: model.pt after a validation, a checkpoint an epoch
            landed = child.wait_for_begin(nth, 600)
            time.sleep(rng.uniform(0.02, 0.9) * slow)
        if child.proc.poll() is not None:  # finished (or failed) before the kill
            child.finish()
            rows.append({"k": k, "mode": mode, "note": f"run ended before the kill (exit {child.proc.returncode})"})
            if child.proc.returncode != 0:
                failures.append(f"kill {k}: the resumed run failed, see {log}")
            break
        in_write, seconds = child.kill()
        after = inspect_checkpoints(os.path.join(killed, "models"))
        row = {"k": k, "mode": mode, "at_s": round(seconds, 1), "in_write": in_write, "resumed": resume, **after}
        row["progress"] = (after["iteration"] or 0) - (before["iteration"] or 0)
        if mode == "in write" and not (landed and in_write):
            row["note"] = "missed the write"
        rows.append(row)
        if not after["loads"] or after["model_loads"] is False:
            failures.append(f"kill {k}: {after['error']}")
    final_log = os.path.join(logs, "killed_final.log")
    resume = inspect_checkpoints(os.path.join(killed, "models"))["latest"] is not None
    rc, _ = run_to_end(train_args(data, killed, iterations, seed, resume), final_log)
    if rc != 0:
        failures.append(f"the final resumed run failed (exit {rc}), see {final_log}")
    comparison = {}
    final_a, final_b = (os.path.join(d, "models", "checkpoint_final.pt") for d in (ref, killed))
    if os.path.isfile(final_b):
        comparison = compare_checkpoints(final_a, final_b)
    return {
        "rows": rows,
        "failures": failures,
        "comparison": comparison,
        "reference_seconds": ref_seconds,
        "iterations": iterations,
        "seed": seed,
    }


def controlled_resume(work: str, data: str, iterations: int, seed: int, slow: float, after_epochs: int) -> dict:
    """Two runs killed right after checkpoint_epoch=<after_epochs>.pt is in place, then resumed: are they equal to
    each other and to the uninterrupted reference?"""
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    reference_run(work, data, iterations, seed, slow)
    finals = []
    for name in ("resumed_a", "resumed_b"):
        run_dir = os.path.join(work, name)
        child = Child(train_args(data, run_dir, iterations, seed, False), os.path.join(logs, f"{name}_1.log"), slow)
        target = os.path.join(run_dir, "models", f"checkpoint_epoch={after_epochs}.pt")
        while not os.path.isfile(target) and child.proc.poll() is None:  # renamed into place: the write is over
            time.sleep(0.05)
        child.kill()
        at = inspect_checkpoints(os.path.join(run_dir, "models"))
        rc, _ = run_to_end(train_args(data, run_dir, iterations, seed, True), os.path.join(logs, f"{name}_2.log"))
        if rc != 0:
            raise RuntimeError(f"resume of {name} failed (exit {rc})")
        finals.append((os.path.join(run_dir, "models", "checkpoint_final.pt"), at["iteration"]))
    reference = os.path.join(work, "reference", "models", "checkpoint_final.pt")
    return {
        "resumed_at": [f[1] for f in finals],
        "a_vs_b": compare_checkpoints(finals[0][0], finals[1][0]),
        "a_vs_reference": compare_checkpoints(reference, finals[0][0]),
    }


def determinism(work: str, data: str, iterations: int, seed: int) -> dict:
    logs = os.path.join(work, "logs")
    out = {}
    for name, s in (("same_seed", seed), ("other_seed", seed + 1)):
        run_dir = os.path.join(work, name)
        rc, _ = run_to_end(train_args(data, run_dir, iterations, s, False), os.path.join(logs, f"{name}.log"))
        if rc != 0:
            raise RuntimeError(f"determinism run {name} failed (exit {rc})")
    for name in ("reference", "same_seed", "other_seed"):
        out[f"metrics_{name}"] = eval_metrics(data, os.path.join(work, name), logs)
    ref = os.path.join(work, "reference", "models", "checkpoint_final.pt")
    out["same_seed"] = compare_checkpoints(ref, os.path.join(work, "same_seed", "models", "checkpoint_final.pt"))
    out["other_seed"] = compare_checkpoints(ref, os.path.join(work, "other_seed", "models", "checkpoint_final.pt"))
    return out


# --------------------------------------------------------------------------------------------- bad inputs


def bad_inputs(work: str, heavy: bool) -> list[dict]:
    """Every case of tests/faults/bad_inputs.py; heavy ones are written here and read in a child process limited to
    6 GiB of address space, whose peak resident memory (VmHWM: ru_maxrss would include this process's) is reported."""
    from tests.faults.bad_inputs import cases, run_case

    rows = []
    for i, case in enumerate(cases()):
        if case.heavy and not heavy:
            continue
        folder = os.path.join(work, "inputs", f"{i:02d}")
        shutil.rmtree(folder, ignore_errors=True)
        if not case.heavy:
            outcome, detail = run_case(case, folder)
            rows.append({"name": case.name, "outcome": outcome, "detail": detail, "peak_mb": None})
            continue
        os.makedirs(folder, exist_ok=True)
        path = case.make(folder)  # here, so that the child's peak memory is the reading alone
        code = (
            "import json, resource, sys, warnings; warnings.filterwarnings('ignore');"
            f"resource.setrlimit(resource.RLIMIT_AS, ({6 * 2**30}, {6 * 2**30})); sys.path.insert(0, {ROOT!r});"
            "from tests.faults.bad_inputs import cases, run_case;"
            f"o, d = run_case(cases()[{i}], {folder!r}, {path!r});"
            "peak = [int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
            "print('RESULT', json.dumps([o, d, peak]))"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            outcome, detail, peak = json.loads(found[-1][7:])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            outcome, detail, peak = "crashed", f"exit {proc.returncode}: {tail[:200]}", None
        rows.append({"name": case.name, "outcome": outcome, "detail": detail, "peak_mb": peak})
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def checkpoint_fault_tests() -> list[dict]:
    """tests/faults/test_checkpoint_faults.py, one row per test (pytest's outcome)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
             "tests/faults/test_checkpoint_faults.py"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        import xml.etree.ElementTree as ET

        rows = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "FAILED"
                elif child.tag == "skipped":
                    outcome = "xfail" if "xfail" in (child.get("type") or "") else "skipped"
            rows.append({"name": case.get("name"), "outcome": outcome})
        return rows


# --------------------------------------------------------------------------------------------- report


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_rows(comparison: dict) -> list[list]:
    return [
        [key, "yes" if v["equal"] else "no", f"{v['max_abs_diff']:.3g}" if v["max_abs_diff"] else "-",
         ", ".join(v["differing"][:3]) + (" ..." if len(v["differing"]) > 3 else "")]
        for key, v in comparison.items()
    ]  # fmt: skip


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    out = []
    cpu = "unknown"
    try:
        cpu = re.search(r"Model name:\s*(.+)", subprocess.run(["lscpu"], capture_output=True, text=True).stdout)[1]
    except Exception:
        pass
    from bundle.environment import source_commit

    commit = source_commit(ROOT)
    tree = commit.removesuffix("-dirty") + (" with uncommitted changes" if commit.endswith("-dirty") else "")
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    runs = results.get("runs", []) + [f"{now}: `{command}` ({', '.join(sorted(results.get('parts_now', [])))})"]
    out.append("Runs (parts run by each):\n\n" + "\n".join(f"- {r}" for r in runs))
    out.append(
        f"\nMachine: {cpu}, {os.cpu_count()} cores (shared with other work, so wall times are loose), "
        f"Python {platform.python_version()}; tree: {tree}."
    )
    if "inputs" in results:
        rows = results["inputs"]
        counts = Counter(r["outcome"] for r in rows)
        out.append("\n### Bad inputs\n")
        out.append(
            md_table(
                ["tried", "refused with a clear message", "accepted (result checked)", "crashed", "silently wrong"],
                [[len(rows), counts["refused"], counts["accepted"], counts["crashed"], counts["silent"]]],
            )
        )
        out.append("")
        out.append(
            md_table(
                ["input", "outcome", "message / check", "peak RSS MB"],
                [[r["name"], r["outcome"], r["detail"][:160],
                  r["peak_mb"] or "-"] for r in rows],  # fmt: skip
            )
        )
    if "checkpoint_faults" in results:
        out.append("\n### Checkpoint faults (tests/faults/test_checkpoint_faults.py)\n")
        out.append(md_table(["test", "outcome"], [[r["name"], r["outcome"]] for r in results["checkpoint_faults"]]))
    if "kill" in results:
        kill = results["kill"]
        rows = [r for r in kill["rows"] if "at_s" in r]
        in_write = sum(bool(r["in_write"]) for r in rows)
        readable = sum(r["loads"] and r["model_loads"] is not False for r in rows)
        out.append(f"\n### kill -9 during training ({kill['iterations']} iterations, seed {kill['seed']})\n")
        out.append(
            md_table(
                ["kills", "inside a checkpoint write", "newest checkpoint readable after the kill", "resume failures",
                 "partial files left (max)", "uninterrupted run (s)"],
                [[len(rows), in_write, readable, len(kill["failures"]),
                  max([r["partial_files"] for r in rows] or [0]), f"{kill['reference_seconds']:.0f}"]],
            )
        )  # fmt: skip
        out.append("")
        out.append(
            md_table(
                ["#", "mode", "killed at (s)", "in a write", "resumed", "newest checkpoint", "its iteration",
                 "loads (weights_only)", "model.pt loads", "partial files"],
                [[r["k"], r["mode"], r["at_s"], "yes" if r["in_write"] else "no", "yes" if r["resumed"] else "no",
                  r["latest"] or "-", r["iteration"] if r["iteration"] is not None else "-",
                  "yes" if r["loads"] else f"NO: {r['error']}",
                  {True: "yes", False: "NO", None: "-"}[r["model_loads"]], r["partial_files"]] for r in rows],
            )
        )  # fmt: skip
        if kill["failures"]:
            out.append("\nFailures: " + "; ".join(kill["failures"]))
        if kill["comparison"]:
            out.append("\nFinal state after all kills vs. the uninterrupted run (checkpoint_final.pt):\n")
            out.append(md_table(["entry", "bitwise equal", "max abs diff", "differing (first)"],
                                comparison_rows(kill["comparison"])))  # fmt: skip
    if "controlled" in results:
        c = results["controlled"]
        out.append(f"\n### One kill right after a checkpoint write, then --resume (resumed at {c['resumed_at']})\n")
        out.append("Two such runs against each other:\n")
        out.append(md_table(["entry", "bitwise equal", "max abs diff", "differing (first)"],
                            comparison_rows(c["a_vs_b"])))  # fmt: skip
        out.append("\nOne of them against the uninterrupted run:\n")
        out.append(md_table(["entry", "bitwise equal", "max abs diff", "differing (first)"],
                            comparison_rows(c["a_vs_reference"])))  # fmt: skip
    if "determinism" in results:
        d = results["determinism"]
        out.append("\n### Determinism (CPU, same machine)\n")
        rows = []
        for name in ("reference", "same_seed", "other_seed"):
            m = d[f"metrics_{name}"]
            seed = args.seed + (name == "other_seed")
            rows.append([name, seed, m.get("auc", m.get("error")), m.get("ap", "-")])
        out.append(md_table(["run", "seed", "test AUC", "test AP"], rows))
        same = all(v["equal"] for v in d["same_seed"].values())
        other = any(not v["equal"] for v in d["other_seed"].values())
        out.append(f"\nSame seed: final checkpoint bitwise equal: {'yes' if same else 'NO'}; other seed differs: "
                   f"{'yes' if other else 'NO'}.")  # fmt: skip
    return "\n".join(out) + "\n"


def write_docs(path: str, text: str, block: str) -> None:
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    doc = open(path).read() if os.path.isfile(path) else "# Reliability\n"
    if begin not in doc or end not in doc:
        doc += f"\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=24, help="kill -9 count (half of them inside a write)")
    parser.add_argument("--iterations", type=int, default=None, help="training length (default 60; quick 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow_save", type=float, default=1.0, help="seconds each checkpoint write takes")
    parser.add_argument("--quick", action="store_true", help="CI: light inputs, no determinism / controlled runs")
    parser.add_argument("--parts", default="inputs,checkpoint_faults,kill,controlled,determinism")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--write-docs", dest="write_docs", action="store_true", help="update docs/reliability.md")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--previous", default=None, help="results (--json) of an earlier run: parts not run now")
    parser.add_argument("--block", default="fault-suite", help="the docs/reliability.md block to replace")
    args = parser.parse_args()
    args.iterations = args.iterations or (12 if args.quick else 60)
    parts = set(args.parts.split(","))
    if args.quick:
        parts -= {"controlled", "determinism"}
    command = "python scripts/fault_suite.py " + " ".join(sys.argv[1:])
    work = args.work or tempfile.mkdtemp(prefix="sagan_faults_")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)
    results: dict = json.load(open(args.previous)) if args.previous else {}
    if args.previous and "runs" not in results:
        results["runs"] = [f"(earlier run, `{args.previous}`)"]
    results["parts_now"] = sorted(parts)
    failed = []
    try:
        from bundle.demo import make_demo_dataset

        data = os.path.join(work, "data")
        if not os.path.isfile(os.path.join(data, "data.json")):
            make_demo_dataset(data, seed=1, sizes=TINY_SIZES)
        if "inputs" in parts:
            results["inputs"] = bad_inputs(work, heavy=not args.quick)
            failed += [f"bad input {r['name']}: {r['outcome']}" for r in results["inputs"] if r["outcome"] in
                       ("crashed", "silent")]  # fmt: skip
        if "checkpoint_faults" in parts:
            results["checkpoint_faults"] = checkpoint_fault_tests()
            failed += [f"checkpoint test {r['name']}" for r in results["checkpoint_faults"] if r["outcome"] == "FAILED"]
        if "kill" in parts:
            results["kill"] = kill_loop(work, data, args.kills, args.iterations, args.seed, args.slow_save, rng)
            failed += results["kill"]["failures"]
        if "controlled" in parts:
            results["controlled"] = controlled_resume(work, data, args.iterations, args.seed, args.slow_save, 2)
        if "determinism" in parts:
            results["determinism"] = determinism(work, data, args.iterations, args.seed)
    finally:
        text = report(results, args, command)
        print(text)
        if args.json:
            now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
            saved = dict(results, runs=results.get("runs", []) + [f"{now}: `{command}` ({', '.join(sorted(parts))})"])
            saved.pop("parts_now", None)
            with open(args.json, "w") as f:
                json.dump(saved, f, indent=1, default=str)
        if args.write_docs:
            write_docs(os.path.join(ROOT, "docs", "reliability.md"), text, args.block)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("FAILURES:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
