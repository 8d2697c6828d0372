#!/usr/bin/env bash
# Creates .venv with everything the bundle and its tests need. Re-running it is cheap (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
# Triton for tests/test_fused_instance_norm.py: its interpreter runs the CUDA instance-norm kernels on the CPU.
# Kept in its own folder (the test puts it on PYTHONPATH) so that nothing else in .venv, torch.compile on the CPU
# included, sees it; GPU machines bring their own Triton with their CUDA build of PyTorch.
[ -d .venv/triton/triton ] || .venv/bin/python -m pip install -q --no-deps --target .venv/triton "triton==3.6.0"
