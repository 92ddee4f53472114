#!/usr/bin/env bash
# Creates the Triton venv (default .venv-triton): nvidia-pytriton's tritonserver, onnxruntime and
# numpy < 2, then checks that the bundled binary and its Python stub are there.
# Usage: tools/triton/setup_env.sh [VENV] [PYTHON]
# On failure the reason is left in VENV.error and the script exits non-zero; the Triton tests
# then skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${1:-.venv-triton}"
python="${2:-python3}"
error="$venv.error"
rm -f "$error" "$venv/.installed"

fail() {
    echo "$1" > "$error"
    echo "tools/triton/setup_env.sh: $1" >&2
    exit 1
}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv" || fail "cannot create a venv with $python"
"$venv/bin/python" -m pip install -q --upgrade pip > "$venv.pip.log" 2>&1 || true
if ! "$venv/bin/python" -m pip install -q -r tools/triton/requirements.txt >> "$venv.pip.log" 2>&1; then
    fail "pip install -r tools/triton/requirements.txt failed: $(grep -E 'ERROR' "$venv.pip.log" | tail -1)"
fi
"$venv/bin/python" - <<'PY' || fail "nvidia-pytriton installed but its tritonserver is incomplete"
import os, sys, pytriton
root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
version = f"{sys.version_info[0]}.{sys.version_info[1]}"
for path in ("bin/tritonserver", f"python_backend_stubs/{version}/triton_python_backend_stub",
             "backends/python/libtriton_python.so"):
    if not os.path.isfile(os.path.join(root, path)):
        sys.exit(f"missing {path}")
import numpy, onnxruntime
assert numpy.__version__.startswith("1."), numpy.__version__
PY
touch "$venv/.installed"
echo "Triton venv ready: $venv"
