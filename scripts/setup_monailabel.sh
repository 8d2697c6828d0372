#!/usr/bin/env bash
# Creates .venv-monailabel: MONAI Label 0.8.5 with the CPU build of torch 2.13.0, MONAI 1.6.1 and what the SAGAN
# MONAI Label app (scripts/monailabel_app) needs. MONAI Label pins numpy<2 and pydicom<3, so it cannot share the
# bundle's .venv. Re-running it is cheap: it stops after a check when nothing it installs has changed.
#
# Elsewhere than on this kind of machine (where pip finds the CPU torch wheel locally), point pip at the CPU
# wheels of torch: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup_monailabel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-monailabel
APP=scripts/monailabel_app
PYTHON=${PYTHON:-python3}
PIP=("$VENV/bin/python" -m pip install -q -c "$APP/constraints.txt")
STAMP="$VENV/.setup-stamp"
# MONAI Label's own bin/monailabel runs whatever `python` is first on PATH (so it fails without an activated
# environment: "No module named 'monailabel'") and passes its arguments as unquoted $* (so `--conf train_overrides
# "--iterations 50"` falls apart into words). Replace it by one that runs this environment's python with "$@".
write_launcher() {
    cat >"$VENV/bin/monailabel" <<'EOF'
#!/usr/bin/env bash
# Written by scripts/setup_monailabel.sh in place of MONAI Label's launcher: runs this environment's python (no
# activation needed) and passes the arguments as given, quoted ones included.
exec "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/python" -m monailabel.main "$@"
EOF
    chmod +x "$VENV/bin/monailabel"
}
stamp_now() { cat "$0" "$APP/requirements.txt" "$APP/constraints.txt" | sha256sum | cut -d' ' -f1; }

check() {
    # never a CUDA build: no nvidia-* wheels and a torch without CUDA
    local nvidia
    nvidia=$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-' || true)
    if [ -n "$nvidia" ]; then
        echo "setup_monailabel.sh: CUDA packages found in $VENV (a CUDA torch was pulled in):" >&2
        echo "$nvidia" >&2
        return 1
    fi
    "$VENV/bin/python" - <<'EOF'
import sys

import monai
import monailabel
import torch

assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}, expected 2.13.0"
assert monai.__version__ == "1.6.1", f"monai {monai.__version__}, expected 1.6.1"
assert monailabel.__version__.startswith("0.8.5"), f"monailabel {monailabel.__version__}, expected 0.8.5"
import highdicom  # (DICOM SEG results)
import itk  # noqa: F401  (ITKReader for DICOM series)
import monailabel.app  # noqa: F401  (the server imports: fails under pydicom 3)
import skimage  # noqa: F401

assert highdicom.__version__ == "0.22.0", f"highdicom {highdicom.__version__}, expected 0.22.0 (pydicom 2)"
print(f"{sys.prefix}: torch {torch.__version__}, monai {monai.__version__}, monailabel {monailabel.__version__}")
EOF
}

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_now)" ]; then
    check && write_launcher && exit 0
    echo "setup_monailabel.sh: $VENV fails its check; reinstalling" >&2
fi

"$PYTHON" - <<'EOF'
import sys

if not (3, 10) <= sys.version_info[:2] <= (3, 12):
    sys.exit(f"setup_monailabel.sh: Python 3.10-3.12 needed for MONAI Label 0.8.5, found {sys.version.split()[0]}")
EOF
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
rm -f "$STAMP"
"$VENV/bin/python" -m pip install -q --upgrade pip
# 1. the CPU torch first; the constraints file keeps it through every later step
"${PIP[@]}" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==2.13.0+cpu" || {
    echo "setup_monailabel.sh: no CPU build of torch 2.13.0 found; set TORCH_INDEX_URL (see the top of this file)" >&2
    exit 1
}
# 2. monailabel without its dependency list (it names sam2, an sdist, and torchvision, which brings a CUDA torch),
#    then its dependencies that the server and the app use, listed in requirements.txt
"${PIP[@]}" --no-deps monailabel==0.8.5
"${PIP[@]}" -r "$APP/requirements.txt"
check
write_launcher
stamp_now >"$STAMP"
