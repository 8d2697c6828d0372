# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Assemble a MONAI model-zoo bundle folder (and its zip) from this repository and a trained model.

    python scripts/export_bundle.py --output_dir dist

exports the shipped pretrained model (``pretrained/``, the paediatric chest X-ray model) with its test metrics as
``sagan_paediatric_cxr_anomaly``; a model of your own:

    python scripts/export_bundle.py --model models/model.pt --metrics eval/metrics.json --output_dir dist \
        --name my_sagan_anomaly

writes ``dist/<name>/`` in the zoo layout and ``dist/<name>.zip``:

    configs/metadata.json    root metadata.json, version bumped (--bump) with a changelog entry, and eval_metrics
                             (AUC, AP, sensitivity, specificity) from the model's own evaluation on its test split
    configs/inference.json   self-contained, with the model's own settings written in (network, size, thresholds);
                             its default input is sample_data/ (a few synthetic images, to check the pipeline runs)
    configs/train.json, evaluate.json, presets/, logging.conf
    bundle/                  the Python package the configs import
    models/model.pt          the trained generator as a plain state dict (what ckpt_export, monai.bundle.load and
                             MONAI Label read without key_in_ckpt); models/model.ts: TorchScript (scripted)
    docs/README.md           the model card: this model's data and metrics first, then the bundle's documentation
                             (results.md and performance.md beside it; links that lead out of the export are made
                             plain text)
    docs/data_license.txt    the terms of the data the shipped weights were trained on
    LICENSE
    large_files.yml          path, url (a placeholder to replace by the hosting URL), hash_type, hash_val of every
                             file over 1 MiB (the zoo's pre-commit check-added-large-files --maxkb=1024); those
                             files are left out of the zip

The zoo's own checks (verify_metadata, verify_net_in_out, ckpt_export, a ConfigWorkflow run) are exercised on
the exported folder by tests/test_zoo_export.py.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # zoo_premerge

import torch  # noqa: E402
import yaml  # noqa: E402
from monai.bundle import ckpt_export  # noqa: E402
from zoo_premerge import write_zoo_unit_test  # noqa: E402

from bundle.demo import make_demo_dataset  # noqa: E402
from bundle.pretrained import PRETRAINED_DIR, pretrained_manifest, pretrained_model_path  # noqa: E402
from bundle.pretrained import sha256_of as sha256  # noqa: E402
from bundle.settings import load_model_settings, model_file_contents, read_model  # noqa: E402

LARGE_FILE_BYTES = 1024 * 1024  # the zoo's pre-commit check-added-large-files --maxkb=1024 refuses larger files
# MONAI Label guesses a bundle's task from its folder name: these words would make it guess wrong
RESERVED_WORDS = ("detection", "segmentation", "classification", "deepedit", "deepgrow")
NAME_PATTERN = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")
SETTING_KEYS = ("image_size", "slice_index", "slice_axis", "threshold")
SAMPLE_SIZES = {"train": (0, 0), "unlabeled": (0, 0), "val": (0, 0), "test": (2, 2)}  # sample_data/: 4 images

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


def exported_metadata(meta: dict, settings: dict, part: str, changelog: str, metrics: dict) -> dict:
    """The zoo's configs/metadata.json: version bumped, changelog entry first, the model's input size."""
    meta = json.loads(json.dumps(meta))
    version = bump_version(meta["version"], part)
    meta["version"] = version
    meta["changelog"] = {version: changelog, **meta["changelog"]}
    size = [settings["image_size"], settings["image_size"]]
    for io in ("inputs", "outputs"):
        for spec in meta["network_data_format"][io].values():
            spec["spatial_shape"] = size
    meta["eval_metrics"] = {k: float(metrics[k]) for k in ("auc", "ap", "sensitivity", "specificity") if k in metrics}
    return meta


def exported_inference_config(config: dict, settings: dict) -> dict:
    """inference.json with the model's settings written in (no read of the model file at parse time) and the
    exported sample images as its default input."""
    config = dict(config)
    config["dataset_dir"] = "$@bundle_root + '/sample_data'"
    config.pop("model_settings", None)
    for key in SETTING_KEYS:
        config[key] = settings[key]
    config["pixel_threshold"] = settings.get("pixel_threshold")
    config["domain"] = settings.get("domain")
    config["normal_scores"] = settings.get("normal_scores")
    config["network_def"] = dict(settings["network_def"])
    return config


# the terms of the data sets this project trains on, by the folder name of their Med-AD root
DATA_TERMS = {
    "demo": "Synthetic images generated by bundle/demo.py (this bundle's own code): no patient data; Apache-2.0 like "
    "the code.",
    "kermany_pneumonia": 'Kermany paediatric chest X-rays: Kermany D. S. et al., "Identifying Medical Diagnoses and '
    'Treatable Diseases by Image-Based Deep Learning", Cell 2018; Mendeley Data doi:10.17632/rscbjbr9sj, licensed '
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). The copy used was re-saved at 224x224 by a third "
    "party. Paediatric (age 1-5) anterior-posterior chest X-rays from one centre (Guangzhou Women and Children's "
    "Medical Center).",
    "odir_fundus": "ODIR-2019 colour fundus photographs: terms not stated where the copy came from; research "
    "benchmarks only, do not redistribute these weights.",
}
MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
DOCS = ("README.md", "results.md", "performance.md")  # docs/ files copied into the export


def check_metrics(metrics: dict, metrics_file: str, model: str, settings: dict) -> None:
    """The metrics must be the model's own (same file, same operating threshold: a model trained again in the same
    place has another), on a test split (the zoo's eval_metrics are test-set figures)."""
    checkpoint = metrics.get("checkpoint")
    if checkpoint and not os.path.isabs(checkpoint) and not os.path.isfile(checkpoint):
        checkpoint = os.path.join(ROOT, checkpoint)  # evaluated from the repository root
    same_file = bool(checkpoint) and os.path.isfile(checkpoint) and os.path.samefile(checkpoint, model)
    if not same_file or metrics.get("threshold") != settings["threshold"]:
        raise ValueError(
            f"{metrics_file} is not an evaluation of {model} (it evaluates {checkpoint!r} at threshold "
            f"{metrics.get('threshold')}; the model's threshold is {settings['threshold']}): run "
            "`python -m monai.bundle run evaluating "
            f"--config_file \"['configs/train.json','configs/evaluate.json']\" --model_path {model} ...` first."
        )
    if metrics.get("split") != "test":
        raise ValueError(f"{metrics_file} is of the {metrics.get('split')!r} split; eval_metrics come from 'test'.")


def data_terms(dataset: str, data_license: str | None) -> str:
    """docs/data_license.txt: what the shipped weights were trained on and under which terms."""
    name = os.path.basename(os.path.normpath(dataset))
    if data_license:
        terms = open(data_license).read().strip()
    elif name in DATA_TERMS:
        terms = DATA_TERMS[name]
    else:
        raise ValueError(
            f"the model was trained and evaluated on {dataset!r}, whose terms this script does not know: pass "
            "--data_license FILE with the data set's licence."
        )
    return (
        f"Data of the weights in models/ (training, validation and test splits of the Med-AD folder '{name}')\n\n"
        f"{terms}\n\nThe weights inherit these terms. The code is Apache-2.0 (LICENSE).\n"
    )


def model_card_header(settings: dict, metrics: dict, dataset: str, use: dict | None = None) -> str:
    """The first section of the exported docs/README.md: what this model is and how it scored; ``use``: the
    ``description``, ``intended_use`` and ``not_for`` of the shipped pretrained model (its manifest)."""
    net = settings["network_def"]
    lines = [
        "# This bundle's model",
        "",
        f"- Data: `{os.path.basename(os.path.normpath(dataset))}` (terms in [data_license.txt](data_license.txt)).",
        f"- Network: `{net['_target_'].rsplit('.', 1)[-1]}` ("
        + ", ".join(f"{k}={v}" for k, v in net.items() if k != "_target_")
        + f"), input {settings['image_size']}x{settings['image_size']} grey.",
        f"- Chosen by `{settings.get('selected_by', 'val_auc')}` at iteration {settings.get('iteration')}; operating "
        f"threshold {settings['threshold']:.6g} (abnormal when the anomaly score exceeds it).",
        f"- Test split ({metrics.get('n_normal')} normal, {metrics.get('n_abnormal')} abnormal images): "
        + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("auc", "ap", "sensitivity", "specificity") if k in metrics)
        + " (sensitivity and specificity at the operating threshold).",
        "- Research use only: not for clinical diagnosis.",
        "",
    ]
    if use:
        lines[1:1] = [
            "",
            f"{use['description']}.",
            "",
            f"- Intended use: {use['intended_use']}",
            f"- Do not use it on: {use['not_for']}",
        ]
    return "\n".join(lines) + "\n"


def localise_links(text: str, exported: set[str]) -> str:
    """Relative links to files outside the export become plain text naming the repository path;
    ``data_license.md`` becomes the exported ``data_license.txt``."""

    def fix(match: re.Match) -> str:
        label, target = match.groups()
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            return match.group(0)
        path, _, anchor = target.partition("#")
        path = "data_license.txt" if path == "data_license.md" else path
        if path in exported:
            return f"[{label}]({path}{'#' + anchor if anchor else ''})"
        return f"{label} (`{os.path.normpath(os.path.join('docs', path))}` in the SAGAN bundle's repository)"

    return MARKDOWN_LINK.sub(fix, text)


def write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=4)
        f.write("\n")


def export(
    model: str,
    output_dir: str,
    name: str = "sagan_anomaly",
    bump: str = "patch",
    changelog: str | None = None,
    metrics_file: str | None = None,
    url_base: str = "https://REPLACE-WITH-HOSTING-URL",
    make_zip: bool = True,
    data_license: str | None = None,
    use: dict | None = None,
) -> str:
    """Writes ``output_dir/name`` (and ``output_dir/name.zip``); returns the folder. ``use``: see
    :func:`model_card_header`."""
    check_name(name)
    settings = load_model_settings(model)
    if settings.get("threshold") is None:
        raise ValueError(f"{model} records no operating threshold: export a model trained by this bundle (>= 0.2).")
    if not metrics_file or not os.path.isfile(metrics_file):
        raise FileNotFoundError(
            f"no evaluation of {model} at {metrics_file!r}: the zoo's eval_metrics come from the model's own test "
            "split; run `python -m monai.bundle run evaluating ...` and pass its metrics.json with --metrics."
        )
    metrics = json.load(open(metrics_file))
    check_metrics(metrics, metrics_file, model, settings)
    license_text = data_terms(metrics["dataset"], data_license)
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
        with open(os.path.join(work, "docs", "data_license.txt"), "w") as f:
            f.write(license_text)
        exported_docs = {*DOCS, "data_license.txt"}
        for doc in DOCS:
            text = localise_links(open(os.path.join(ROOT, "docs", doc)).read(), exported_docs)
            if doc == "README.md":
                text = model_card_header(settings, metrics, metrics["dataset"], use) + text
            with open(os.path.join(work, "docs", doc), "w") as f:
                f.write(text)
        shutil.copy(os.path.join(ROOT, "LICENSE"), work)
        sample = make_demo_dataset(os.path.join(work, ".sample"), sizes=SAMPLE_SIZES)
        shutil.move(os.path.join(sample, "images"), os.path.join(work, "sample_data"))
        shutil.rmtree(sample)
        os.makedirs(os.path.join(work, "models"))
        state, _ = read_model(model)
        torch.save(model_file_contents(state, settings), os.path.join(work, "models", "model.pt"))
        ckpt_export(  # as the zoo's verify_bundle.py calls it: no key_in_ckpt
            net_id="network_def",
            filepath=os.path.join(work, "models", "model.ts"),
            ckpt_file=os.path.join(work, "models", "model.pt"),
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
        write_zoo_unit_test(final, name)  # <output_dir>/ci/unit_tests/test_<name>.py, outside the bundle
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
    parser.add_argument("--model", help="a trained model.pt (default: the shipped pretrained model)")
    parser.add_argument("--output_dir", default="dist", help="where dist/<name>/ and dist/<name>.zip go")
    parser.add_argument("--name", help="bundle name, zoo pattern (default for the pretrained model: its bundle_name)")
    parser.add_argument("--bump", choices=("patch", "minor", "major"), default="patch", help="version part to bump")
    parser.add_argument("--changelog", help="changelog entry of the new version (default: the model's settings)")
    parser.add_argument(
        "--metrics",
        help="metrics.json of `run evaluating` on the model's test split: its eval_metrics, data and licence "
        "(default: eval/metrics.json; for the pretrained model pretrained/metrics_test.json)",
    )
    parser.add_argument("--data_license", help="a text file with the training data's terms (for unknown data sets)")
    parser.add_argument("--url_base", default="https://REPLACE-WITH-HOSTING-URL", help="URL prefix of large files")
    parser.add_argument("--no_zip", action="store_true", help="write the folder only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    use = None
    if args.model is None:
        use = pretrained_manifest()
        args.model = pretrained_model_path()
        args.metrics = args.metrics or os.path.join(PRETRAINED_DIR, "metrics_test.json")
        args.name = args.name or use["bundle_name"]
    elif not args.name:
        parser.error("--name is required for a model of your own (say what it detects, e.g. my_cxr_anomaly)")
    folder = export(
        args.model,
        args.output_dir,
        args.name,
        args.bump,
        args.changelog,
        args.metrics or os.path.join("eval", "metrics.json"),
        args.url_base,
        not args.no_zip,
        args.data_license,
        use,
    )
    print(f"exported {folder} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
