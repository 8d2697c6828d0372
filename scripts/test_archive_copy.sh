#!/usr/bin/env bash
# Runs the test suite in a copy of the tracked files without .git (what a release archive or a zoo download gives a
# user), after the user's normal work has left its files there: README.md's first command (demo training and
# evaluation: data/demo, models/, eval/, runs/), a resumed run and a zoo export (dist/). The suite must not depend on
# git or on a clean checkout.
#
#     bash scripts/test_archive_copy.sh [pytest arguments, default: -q tests]
#
# Needs .venv and .venv-monailabel (README's setup commands); the copy uses them through symbolic links and sits in
# a temporary folder beside a link to ../shared, where the tests find the data sets. Commit first: the copy is
# `git archive HEAD`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
[ -x .venv/bin/python ] || { echo "$0: run README.md's setup first (no .venv)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
copy="$tmp/sagan_bundle"
mkdir "$copy"
git archive HEAD | tar -x -C "$copy"
[ -e ../shared ] && ln -s "$(realpath ../shared)" "$tmp/shared"
for venv in .venv .venv-monailabel; do
    [ -e "$venv" ] && ln -s "$root/$venv" "$copy/$venv"
done
cd "$copy"
[ ! -e .git ] || { echo "$0: the copy has a .git" >&2; exit 1; }

# README.md's first command, exactly as written there (the first ```bash block)
command1=$(awk '/^```bash$/ {inside = 1; next} inside && /^```$/ {exit} inside' README.md)
echo "+ $command1"
bash -euo pipefail -c "$command1"
.venv/bin/python -m monai.bundle run training --config_file configs/train.json --resume True
.venv/bin/python scripts/export_bundle.py --model models/model.pt --metrics eval/metrics.json --output_dir dist --name sagan_demo_anomaly
for path in models/model.pt eval/metrics.json data/demo/data.json dist/sagan_demo_anomaly.zip; do
    [ -e "$path" ] || { echo "$0: $path missing after the user's commands" >&2; exit 1; }
done
if [ $# -eq 0 ]; then
    set -- -q tests
fi
.venv/bin/python -m pytest "$@"
