#!/usr/bin/env bash
# Creates .venv with everything the bundle and its tests need. Re-running it is cheap (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
