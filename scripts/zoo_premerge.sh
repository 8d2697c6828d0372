#!/usr/bin/env bash
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
#
# Rehearse the MONAI model zoo's premerge checks on this bundle, offline, in a checkout of the zoo
# (github Project-MONAI/model-zoo).
#
#   bash scripts/zoo_premerge.sh ZOO_CHECKOUT [BUNDLE_FOLDER]
#
# BUNDLE_FOLDER: an exported bundle (dist/<name>/); without it, scripts/export_bundle.py exports $MODEL
# (default models/model.pt, with $EXPORT_ARGS, e.g. "--metrics eval/metrics.json"), or, when that file does not
# exist, a tiny model trained for 4 iterations on a small generated demo set (a rehearsal of the checks, not a
# model to submit). The folder is copied to ZOO_CHECKOUT/models/<name> (replacing it) and its unit test
# (<folder>/../ci/unit_tests/test_<name>.py, written if absent) to ZOO_CHECKOUT/ci/unit_tests/test_<name>.py; then
# each step runs and prints PASS / FAIL (its output's tail on failure; full logs in $LOG_DIR). Exit status 1 when
# any step failed.
#
# Steps, as the zoo's CI runs them (ci/run_premerge_cpu.sh, ci/run_premerge_gpu.sh, code-format-check.yml,
# .pre-commit-config.yaml):
#   schema        ci/prepare_schema.py downloads the metadata's "schema" URL (internet). Offline: the local copy
#                 ($SCHEMA, default ../shared/schemas/<schema file>) is placed where it puts it
#                 (models/<schema file> and models/<name>/eval/schema.json); the download runs only without it
#   requirements  ci/get_bundle_requirements.py writes requirements_<name>.txt, which CI pip-installs (internet);
#                 here the pins are compared with this Python's installed versions (a mismatch is a WARN, a
#                 FAIL with STRICT_REQUIREMENTS=1)
#   large_files   large_files.yml: CI downloads each file (internet); here the local copies' sha256 are checked
#                 (verify_bundle.py then finds them present and downloads nothing) and placeholder URLs reported
#   verify_min    python ci/verify_bundle.py -b <name> -m min      (CPU premerge)
#   verify_full   python ci/verify_bundle.py -b <name> -m full     (GPU premerge: + properties, verify_net_in_out,
#                 ckpt_export without key_in_ckpt, model.ts load); run here with CUDA_VISIBLE_DEVICES=""
#   metadata      python -m monai.bundle verify_metadata against the local schema (also part of verify_*)
#   unit_test     python ci/unit_tests/runner.py --b <name>        (GPU premerge; runs on CPU too)
#   flake8        python -m flake8 (the zoo's setup.cfg; plugins pep8-naming, flake8-bugbear,
#                 flake8-comprehensions, flake8-executable from its requirements-dev.txt) on models/<name> and
#                 the unit test
#   black, isort  runtests.sh --codeformat: black --skip-magic-trailing-comma --check, isort --check (the zoo's
#                 pyproject.toml / setup.cfg)
#   pytype        also in runtests.sh --codeformat; only with ZOO_PYTYPE=1 and pytype installed (slow)
#   pre-commit    the zoo's pre-commit hooks (check-added-large-files --maxkb from its .pre-commit-config.yaml,
#                 pretty-format-json, end-of-file-fixer, ...) on the bundle's files staged in a temporary git
#                 repository, plus a check that the zoo's .gitignore drops none of them
#
# Environment: PYTHON (default: .venv/bin/python of this repository, else python3), LOG_DIR, SCHEMA, MODEL,
# EXPORT_ARGS, ZOO_PYTYPE, STRICT_REQUIREMENTS.

set -u -o pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZOO="$(cd "$1" && pwd)" || exit 2
if [[ ! -f "$ZOO/ci/verify_bundle.py" ]]; then
    echo "$ZOO is not a model-zoo checkout (no ci/verify_bundle.py)"
    exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
PYTHON="$(command -v "$PYTHON")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/zoo_premerge.XXXXXX")"
LOG_DIR="${LOG_DIR:-$WORK/logs}"
mkdir -p "$LOG_DIR"
FAILED=()
PASSED=()

# step NAME COMMAND...: runs COMMAND (in the current directory), logs to $LOG_DIR/NAME.log, prints PASS/FAIL
step() {
    local name="$1"
    shift
    local log="$LOG_DIR/$name.log"
    local start=$SECONDS
    "$@" >"$log" 2>&1
    local rc=$?
    if [[ $rc -eq 0 ]]; then
        PASSED+=("$name")
        echo "PASS $name ($((SECONDS - start)) s)"
        grep -E '^(PASS|WARN|FAIL|SKIP) ' "$log" | sed 's/^/    /'
    else
        FAILED+=("$name")
        echo "FAIL $name ($((SECONDS - start)) s, exit $rc): $*"
        tail -n 25 "$log" | sed 's/^/    | /'
    fi
    return 0
}

# --- the bundle folder -----------------------------------------------------------------------------------------
if [[ $# -eq 2 ]]; then
    FOLDER="$(cd "$2" && pwd)" || exit 2
else
    MODEL="${MODEL:-$REPO/models/model.pt}"
    if [[ -f "$MODEL" ]]; then
        echo "exporting $MODEL"
        # shellcheck disable=SC2086
        (cd "$REPO" && "$PYTHON" scripts/export_bundle.py --model "$MODEL" --output_dir "$WORK/dist" ${EXPORT_ARGS:-}) \
            >"$LOG_DIR/export.log" 2>&1 || { echo "FAIL export"; tail -n 25 "$LOG_DIR/export.log"; exit 1; }
    else
        echo "no $MODEL: exporting a tiny model trained for 4 iterations on a generated demo set (rehearsal only)"
        (
            set -e
            cd "$REPO"
            "$PYTHON" -c "import sys; sys.path.insert(0, '.'); from bundle.demo import make_demo_dataset; \
make_demo_dataset(sys.argv[1], seed=1, sizes={'train': (12, 0), 'unlabeled': (8, 12), 'val': (6, 6), \
'test': (6, 6)})" "$WORK/demo"
            "$PYTHON" -m monai.bundle run training --config_file configs/train.json --dataset_dir "$WORK/demo" \
                --ckpt_dir "$WORK/models" --output_dir "$WORK/runs" --iterations 4 --progress_bar False \
                --conv_dim 4 --num_res_blocks 1 --d_conv_dim 4 --batch_size 4 --val_interval 2
            "$PYTHON" -m monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json']" \
                --dataset_dir "$WORK/demo" --model_path "$WORK/models/model.pt" --eval_dir "$WORK/eval" \
                --progress_bar False
            # shellcheck disable=SC2086
            "$PYTHON" scripts/export_bundle.py --model "$WORK/models/model.pt" --metrics "$WORK/eval/metrics.json" \
                --output_dir "$WORK/dist" ${EXPORT_ARGS:-}
        ) >"$LOG_DIR/export.log" 2>&1 || { echo "FAIL export"; tail -n 25 "$LOG_DIR/export.log"; exit 1; }
    fi
    FOLDER="$(ls -d "$WORK"/dist/*/ 2>/dev/null | head -n 1)"
    FOLDER="${FOLDER%/}"
fi
NAME="$(basename "${FOLDER:-}")"
if [[ -z "${FOLDER:-}" || -z "$NAME" || ! -f "$FOLDER/configs/metadata.json" ]]; then
    echo "FAIL export: no exported bundle folder (got '${FOLDER:-}'; EXPORT_ARGS must not set --output_dir)"
    exit 1
fi
DEST="$ZOO/models/$NAME"
UNIT_TEST="$ZOO/ci/unit_tests/test_$NAME.py"
echo "bundle $NAME: $FOLDER -> $DEST; python $PYTHON; logs in $LOG_DIR"
if [[ -d "$ZOO/.git" ]]; then
    echo "zoo commit $(git -C "$ZOO" rev-parse HEAD 2>/dev/null)"
fi
if [[ "$FOLDER" != "$DEST" ]]; then
    rm -rf "$DEST"
    cp -r "$FOLDER" "$DEST"
fi
find "$DEST" -name __pycache__ -type d -prune -exec rm -rf {} +
EXPORTED_TEST="$(dirname "$FOLDER")/ci/unit_tests/test_$NAME.py"
if [[ -f "$EXPORTED_TEST" ]]; then
    cp "$EXPORTED_TEST" "$UNIT_TEST"
    echo "unit test: $EXPORTED_TEST -> $UNIT_TEST"
else
    "$PYTHON" "$REPO/scripts/zoo_premerge.py" unit_test "$FOLDER" --name "$NAME" --to "$UNIT_TEST" >/dev/null
    echo "unit test: not in the export (no $EXPORTED_TEST): written from the template to $UNIT_TEST"
fi
cd "$ZOO" || exit 2
export ALLOW_MONAI_RC=true  # as both premerge scripts

# --- schema: ci/prepare_schema.py, offline where a local copy exists --------------------------------------------
prepare_schema() {
    local url file local_schema
    url="$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['schema'])" "$DEST/configs/metadata.json")"
    file="$(basename "$url")"
    local_schema="${SCHEMA:-$REPO/../shared/schemas/$file}"
    if [[ -f "$local_schema" ]]; then
        echo "PASS local schema $local_schema placed as models/$file and models/$NAME/eval/schema.json (no download of $url)"
        cp "$local_schema" "models/$file"
        mkdir -p "$DEST/eval"
        cp "$local_schema" "$DEST/eval/schema.json"
    else
        echo "no local $local_schema: ci/prepare_schema.py downloads $url (needs the internet)"
        "$PYTHON" ci/prepare_schema.py --l "$NAME"
    fi
}
step schema prepare_schema

# --- requirements: ci/get_bundle_requirements.py; CI pip-installs them (internet) --------------------------------
check_requirements() {
    local req
    req="$("$PYTHON" ci/get_bundle_requirements.py --b "$NAME")" || return 1
    [[ -z "$req" ]] && { echo "no requirements"; return 0; }
    echo "CI would run: pip install --pre -r $req (needs the internet); here: compared with the installed versions"
    cat "$req"
    "$PYTHON" - "$req" "${STRICT_REQUIREMENTS:-0}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement

bad = 0
strict = "FAIL" if sys.argv[2] == "1" else "WARN"
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    req = Requirement(line.strip())
    try:
        have = version(req.name).split("+")[0]
    except PackageNotFoundError:
        have = None
    ok = have is not None and req.specifier.contains(have, prereleases=True)
    bad += not ok
    note = "" if ok else ": this rehearsal ran on another version than the zoo's CI installs"
    print(f"{'PASS' if ok else strict} {req} (installed: {have}){note}")
sys.exit(1 if bad and strict == "FAIL" else 0)
EOF
}
step requirements check_requirements

# --- large files: verify_bundle.py downloads them (internet); here the local copies are checked ------------------
check_large_files() {
    "$PYTHON" - "$DEST" <<'EOF'
import glob, hashlib, os, sys

import yaml

folder = sys.argv[1]
files = [f for f in glob.glob(os.path.join(folder, "large_files.*")) if f.endswith((".yml", ".yaml", ".json"))]
if not files:
    print("no large_files.yml: nothing to download")
    sys.exit(0)
entries = yaml.safe_load(open(files[0]))["large_files"]
print(f"{files[0]}: {len(entries)} entries; the zoo's CI downloads each from its url (needs the internet)")
bad = 0
for e in entries:
    path = os.path.join(folder, e["path"])
    if not os.path.isfile(path):
        print(f"FAIL {e['path']}: no local copy: only the download (internet) can provide it")
        bad += 1
        continue
    if e.get("hash_val"):
        digest = hashlib.new(e.get("hash_type", "md5"))
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        ok = digest.hexdigest() == e["hash_val"]
        bad += not ok
        print(f"{'PASS' if ok else 'FAIL'} {e['path']}: local copy's {e.get('hash_type', 'md5')} "
              f"{'matches' if ok else 'differs from'} hash_val")
    if "REPLACE" in e.get("url", "") or not e.get("url", "").startswith("http"):
        print(f"WARN {e['path']}: url {e.get('url')!r} is a placeholder: the zoo's download would fail")
sys.exit(1 if bad else 0)
EOF
}
step large_files check_large_files

# --- verify_bundle.py, min (CPU premerge) and full (GPU premerge), on CPU -----------------------------------------
step verify_min env CUDA_VISIBLE_DEVICES="" "$PYTHON" ci/verify_bundle.py -b "$NAME" -m min
step verify_full env CUDA_VISIBLE_DEVICES="" PYTHONPATH="$ZOO" "$PYTHON" ci/verify_bundle.py -b "$NAME" -m full
rm -f "$DEST/models/verify_model.ts"  # written by verify_full's ckpt_export

# --- metadata against the schema (verify_bundle.py's verify_metadata_format, on its own) -------------------------
step metadata "$PYTHON" -m monai.bundle verify_metadata --meta_file "$DEST/configs/metadata.json" \
    --filepath "$DEST/eval/schema.json"

# --- the zoo's unit test, through its runner (GPU premerge), on CPU ----------------------------------------------
step unit_test env CUDA_VISIBLE_DEVICES="" PYTHONPATH="$ZOO" "$PYTHON" ci/unit_tests/runner.py --b "$NAME"

# --- code format (runtests.sh --codeformat), on the bundle's files only ------------------------------------------
CODE=("models/$NAME" "ci/unit_tests/test_$NAME.py")
check_flake8() {
    local version
    version="$("$PYTHON" -m flake8 --version)" || return 1
    echo "$version"
    local missing=()
    for plugin in pep8-naming flake8-bugbear flake8-comprehensions flake8-executable; do
        [[ "$version" == *"$plugin"* ]] || missing+=("$plugin")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "the zoo's flake8 plugins are not installed: ${missing[*]} (pip install ${missing[*]})"
        return 1
    fi
    "$PYTHON" -m flake8 "${CODE[@]}" --count --statistics  # reads the zoo's setup.cfg [flake8]
}
step flake8 check_flake8
step black "$PYTHON" -m black --skip-magic-trailing-comma --check --diff "${CODE[@]}"  # the zoo's pyproject.toml
step isort "$PYTHON" -m isort --check --diff --settings-path "$ZOO" "${CODE[@]}"  # the zoo's setup.cfg [isort]
if [[ "${ZOO_PYTYPE:-0}" == 1 ]]; then
    step pytype "$PYTHON" -m pytype --config pyproject.toml "models/$NAME"
else
    echo "SKIP pytype (runtests.sh --codeformat runs it on models/ and ci/: set ZOO_PYTYPE=1 with pytype installed)"
fi

# --- pre-commit hooks on the bundle's files, staged in a temporary git repository --------------------------------
MAXKB="$(grep -o -- '--maxkb=[0-9]*' .pre-commit-config.yaml | head -n 1 | cut -d= -f2)"
step pre_commit "$PYTHON" "$REPO/scripts/zoo_premerge.py" hooks "$FOLDER" --name "$NAME" --maxkb "${MAXKB:-1024}" \
    --gitignore "$ZOO/.gitignore"

# --- summary ------------------------------------------------------------------------------------------------------
echo "passed: ${PASSED[*]:-none}"
echo "failed: ${FAILED[*]:-none}"
echo "logs: $LOG_DIR"
[[ ${#FAILED[@]} -eq 0 ]]
