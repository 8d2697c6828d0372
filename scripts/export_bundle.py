# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Assemble a MONAI model-zoo bundle folder (and its zip) from this repository and a trained model.

    python scripts/export_bundle.py --model models/model.pt --output_dir dist [--name sagan_xray_anomaly]

writes ``dist/<name>/`` in the zoo layout and ``dist/<name>.zip``:

    configs/metadata.json    root metadata.json, version bumped (--bump) with a changelog entry
    configs/inference.json   self-contained, with the model's own settings written in (network, size, thresholds)
    configs/train.json, evaluate.json, presets/, logging.conf
    bundle/                  the Python package the configs import
    models/model.pt          the trained generator and its settings; models/model.ts: TorchScript (scripted)
    docs/README.md, docs/data_license.txt, LICENSE
    large_files.yml          path, url (a placeholder to replace by the hosting URL), hash_type, hash_val of every
                             file over 25 MB; those files are left out of the zip

The zoo's own checks (verify_metadata, verify_net_in_out, ckpt_export, a ConfigWorkflow run) are exercised on
the exported folder by tests/test_zoo_export.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402
from monai.bundle import ckpt_export  # noqa: E402

from bundle.settings import load_model_settings  # noqa: E402

LARGE_FILE_BYTES = 25 * 1024 * 1024  # the model zoo keeps files above this out of its repository
# MONAI Label guesses a bundle's task from its folder name: these words would make it guess wrong
RESERVED_WORDS = ("detection", "segmentation", "classification", "deepedit", "deepgrow")
NAME_PATTERN = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")
SETTING_KEYS = ("image_size", "slice_index", "threshold")

logger = logging.getLogger("export_bundle")


def check_name(name: str) -> None:
    """The zoo's naming pattern (lower-case words joined by underscores), without MONAI Label's task words."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"bundle name {name!r}: use lower-case letters and digits joined by underscores.")
    reserved = [w for w in RESERVED_WORDS if w in name]
    if reserved:
        raise ValueError(f"bundle name {name!r} contains {reserved}: MONAI Label would guess the wrong task type.")


def bump_version(version: str, part: str) -> str:
    """Semantic version bump: ``0.2.0`` -> ``0.2.1`` (patch), ``0.3.0`` (minor), ``1.0.0`` (major)."""
    major, minor, patch = (int(v) for v in version.split("."))
    return {"major": f"{major + 1}.0.0", "minor": f"{major}.{minor + 1}.0", "patch": f"{major}.{minor}.{patch + 1}"}[
        part
    ]


def exported_metadata(meta: dict, settings: dict, part: str, changelog: str, metrics: dict | None) -> dict:
    """The zoo's configs/metadata.json: version bumped, changelog entry first, the model's input size."""
    meta = json.loads(json.dumps(meta))
    version = bump_version(meta["version"], part)
    meta["version"] = version
    meta["changelog"] = {version: changelog, **meta["changelog"]}
    size = [settings["image_size"], settings["image_size"]]
    for io in ("inputs", "outputs"):
        for spec in meta["network_data_format"][io].values():
            spec["spatial_shape"] = size
    if metrics:
        meta["eval_metrics"] = {
            k: float(metrics[k]) for k in ("auc", "ap", "sensitivity", "specificity") if k in metrics
        }
    return meta


def exported_inference_config(config: dict, settings: dict) -> dict:
    """inference.json with the model's settings written in: no read of the model file at parse time."""
    config = dict(config)
    config.pop("model_settings", None)
    for key in SETTING_KEYS:
        config[key] = settings[key]
    config["pixel_threshold"] = settings.get("pixel_threshold")
    config["network_def"] = dict(settings["network_def"])
    return config


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=4)
        f.write("\n")


def export(
    model: str,
    output_dir: str,
    name: str = "sagan_xray_anomaly",
    bump: str = "patch",
    changelog: str | None = None,
    metrics_file: str | None = None,
    url_base: str = "https://REPLACE-WITH-HOSTING-URL",
    make_zip: bool = True,
) -> str:
    """Writes ``output_dir/name`` (and ``output_dir/name.zip``); returns the folder."""
    check_name(name)
    settings = load_model_settings(model)
    if settings.get("threshold") is None:
        raise ValueError(f"{model} records no operating threshold: export a model trained by this bundle (>= 0.2).")
    metrics = json.load(open(metrics_file)) if metrics_file else None
    net = settings["network_def"]
    changelog = changelog or (
        f"model {net['_target_'].rsplit('.', 1)[-1]} ("
        + ", ".join(f"{k}={v}" for k, v in net.items() if k != "_target_")
        + f"), input {settings['image_size']}x{settings['image_size']}"
    )
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, name)
    work = tempfile.mkdtemp(prefix=f".{name}.", dir=output_dir)  # assembled aside, then renamed into place
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(os.path.join(ROOT, "bundle"), os.path.join(work, "bundle"), ignore=ignore)
        configs = os.path.join(work, "configs")
        shutil.copytree(os.path.join(ROOT, "configs", "presets"), os.path.join(configs, "presets"))
        for f in ("train.json", "evaluate.json", "multi_gpu_train.json", "mlflow.json", "logging.conf"):
            shutil.copy(os.path.join(ROOT, "configs", f), configs)
        inference = json.load(open(os.path.join(ROOT, "configs", "inference.json")))
        write_json(os.path.join(configs, "inference.json"), exported_inference_config(inference, settings))
        meta = json.load(open(os.path.join(ROOT, "metadata.json")))
        write_json(os.path.join(configs, "metadata.json"), exported_metadata(meta, settings, bump, changelog, metrics))
        os.makedirs(os.path.join(work, "docs"))
        shutil.copy(os.path.join(ROOT, "docs", "README.md"), os.path.join(work, "docs", "README.md"))
        shutil.copy(os.path.join(ROOT, "docs", "data_license.md"), os.path.join(work, "docs", "data_license.txt"))
        shutil.copy(os.path.join(ROOT, "LICENSE"), work)
        os.makedirs(os.path.join(work, "models"))
        shutil.copy(model, os.path.join(work, "models", "model.pt"))
        ckpt_export(
            net_id="network_def",
            filepath=os.path.join(work, "models", "model.ts"),
            ckpt_file=os.path.join(work, "models", "model.pt"),
            key_in_ckpt="model",
            meta_file=os.path.join(configs, "metadata.json"),
            config_file=os.path.join(configs, "inference.json"),
            bundle_root=work,
            use_trace=False,
        )
        large = []
        for folder, _, files in os.walk(work):
            for f in sorted(files):
                path = os.path.join(folder, f)
                if os.path.getsize(path) > LARGE_FILE_BYTES:
                    rel = os.path.relpath(path, work)
                    url = f"{url_base.rstrip('/')}/{rel}"
                    large.append({"path": rel, "url": url, "hash_type": "sha256", "hash_val": sha256(path)})
        with open(os.path.join(work, "large_files.yml"), "w") as f:
            yaml.safe_dump({"large_files": large}, f, sort_keys=False)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if make_zip:
        skip = {entry["path"] for entry in large}
        tmp_zip = os.path.join(output_dir, f".{name}.zip.tmp")
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as z:
            for folder, _, files in os.walk(final):
                for f in sorted(files):
                    rel = os.path.relpath(os.path.join(folder, f), final)
                    if rel not in skip:
                        z.write(os.path.join(folder, f), os.path.join(name, rel))
        os.replace(tmp_zip, os.path.join(output_dir, f"{name}.zip"))
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join("models", "model.pt"), help="trained model.pt")
    parser.add_argument("--output_dir", default="dist", help="where dist/<name>/ and dist/<name>.zip go")
    parser.add_argument("--name", default="sagan_xray_anomaly", help="bundle name (zoo pattern)")
    parser.add_argument("--bump", choices=("patch", "minor", "major"), default="patch", help="version part to bump")
    parser.add_argument("--changelog", help="changelog entry of the new version (default: the model's settings)")
    parser.add_argument("--metrics", help="an eval/metrics.json to record as eval_metrics in the metadata")
    parser.add_argument("--url_base", default="https://REPLACE-WITH-HOSTING-URL", help="URL prefix of large files")
    parser.add_argument("--no_zip", action="store_true", help="write the folder only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    folder = export(
        args.model, args.output_dir, args.name, args.bump, args.changelog, args.metrics, args.url_base, not args.no_zip
    )
    print(f"exported {folder} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
