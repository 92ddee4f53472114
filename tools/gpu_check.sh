#!/usr/bin/env bash
# The GPU device check (docs/gpu.md): on a fresh GPU machine, in under 8 minutes,
#   1. installs segserve with the gpu extra into $VENV (default .venv-gpu),
#   2. runs the GPU tests (tests/test_device_pipeline.py, test_tensorrt.py, test_gpu_metrics.py;
#      nothing may skip for want of CUDA, TensorRT or NVML here),
#   3. builds an FP16 engine of the bundled deeplabv3plus_camvid (segserve build-engine),
#   4. benchmarks it: the device pipeline per 1080p frame, TensorRT's own throughput of the
#      engine (polygraphy), segserve end to end on the engine and on the CPU path,
# and prints one table (benchmarks/gpu_bench.py), also written to $OUT_DIR/gpu_bench.json.
#
#   tools/gpu_check.sh                    # pip from the package index
#   WHEELHOUSE=wheels tools/gpu_check.sh  # offline: pip --no-index --find-links wheels
#   NO_INSTALL=1 tools/gpu_check.sh       # use $PYTHON's environment as it is
#   ORT_GPU=1 tools/gpu_check.sh          # also swap onnxruntime for onnxruntime-gpu (CUDA EP)
#
# Exit status: 0 when every step ran (the table says whether the targets were met), else the
# failing step's. Written without a GPU: nothing here has run on hardware yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/gpu}}
MODEL=${MODEL:-deeplabv3plus_camvid}
DEVICE=${DEVICE:-cuda:0}
started=$(date +%s)
step() { echo "== [$(($(date +%s) - started)) s] $*"; }

step "GPU"
if ! nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader; then
    echo "gpu_check: nvidia-smi sees no GPU" >&2
    exit 1
fi

if [ "${NO_INSTALL:-0}" = 1 ]; then
    PY=$PYTHON
else
    step "install segserve[gpu] into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PY=$VENV/bin/python
    pip_args=(-q --disable-pip-version-check)
    if [ -n "${WHEELHOUSE:-}" ]; then pip_args+=(--no-index --find-links "$WHEELHOUSE"); fi
    "$PY" -m pip install "${pip_args[@]}" -e ".[gpu,train]" \
        pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
    if [ "${ORT_GPU:-0}" = 1 ]; then
        # onnxruntime and onnxruntime-gpu install the same module: one at a time (docs/gpu.md).
        "$PY" -m pip uninstall -y -q onnxruntime
        "$PY" -m pip install "${pip_args[@]}" onnxruntime-gpu==1.31.1
    fi
fi
mkdir -p "$OUT_DIR"

step "versions"
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("tensorrt", "torchvision", "pynvml", "polygraphy", "onnxruntime"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF

step "GPU tests"
set +e
timeout 300 "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_device_pipeline.py tests/test_tensorrt.py tests/test_gpu_metrics.py \
    tests/test_ort_iobinding.py tests/test_jpeg_batch.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
set -e
tests_summary=$(tail -n 1 "$OUT_DIR/gpu_tests.log")
skipped_for_gpu=$(grep -cE "SKIPPED.*(needs CUDA|needs TensorRT|needs a GPU|onnxruntime-gpu)" \
    "$OUT_DIR/gpu_tests.log" || true)

step "engine build and benchmark ($MODEL on $DEVICE)"
timeout 420 "$PY" benchmarks/gpu_bench.py --model "$MODEL" --device "$DEVICE" \
    --work "${WORK_DIR:-$(mktemp -d)}" --out "$OUT_DIR/gpu_bench.json" \
    --note "GPU tests=$tests_summary (exit $tests_status; $skipped_for_gpu skipped for want of a GPU part)"

step "done"
exit "$tests_status"
