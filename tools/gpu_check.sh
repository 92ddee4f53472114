#!/usr/bin/env bash
# The GPU device check (docs/gpu.md): on a fresh GPU machine, in about 8 minutes after the
# install (the tests are cut off at 180 s, the benchmark at 300 s: inside a 600 s command limit),
#   1. installs segserve with the gpu extra into $VENV (default .venv-gpu; needs python3-venv,
#      `apt-get install python3-venv` on Debian and Ubuntu) with what the tests import,
#   2. runs the GPU tests (tests/test_device_pipeline.py, test_tensorrt.py, test_gpu_metrics.py,
#      test_ort_iobinding.py, test_jpeg_batch.py; nothing may skip for want of CUDA, TensorRT or
#      NVML here: the table counts such skips),
#   3. builds an FP16 engine of the bundled deeplabv3plus_camvid (segserve build-engine, from its
#      latest unquantized version: version 1, FP32; version 2 is INT8 QDQ),
#   4. benchmarks it: the device pipeline per 1080p frame, TensorRT's own throughput of the
#      engine (polygraphy, else segserve's TensorRT binding), segserve end to end on the engine
#      and on the CPU path (the same FP32 version),
# and prints one table (benchmarks/gpu_bench.py), also written to $OUT_DIR/gpu_bench.json after
# each stage; a stage that fails is a row of the table naming the error.
#
#   tools/gpu_check.sh                    # pip from the package index
#   WHEELHOUSE=wheels tools/gpu_check.sh  # offline: pip --no-index --find-links wheels; the
#                                         # folder must hold setuptools and wheel too (segserve
#                                         # is installed --no-build-isolation)
#   NO_INSTALL=1 PYTHON=python3 tools/gpu_check.sh  # use $PYTHON's environment as it is; segserve
#                                         # from server/ and clients/ if it is not installed
#   ORT_GPU=1 tools/gpu_check.sh          # also swap onnxruntime for onnxruntime-gpu (CUDA EP)
#   BENCH_ARGS="--stages pipeline" tools/gpu_check.sh  # extra gpu_bench.py arguments
#
# The gpu extra pins torch 2.14.1 (CUDA 13) and the train extra torch 2.13.0 (CPU), so `.[gpu]`
# is installed alone, with the tests' own needs (pytest and its plugins; onnx is in the gpu
# extra). Exit status: the tests' when they failed, else the benchmark's (124: cut off; the
# table still says whether the targets were met). Written without a GPU: nothing here has run
# on hardware yet.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results/gpu}}
MODEL=${MODEL:-deeplabv3plus_camvid}
DEVICE=${DEVICE:-cuda:0}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-180}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-300}
started=$(date +%s)
step() { echo "== [$(($(date +%s) - started)) s] $*"; }

step "GPU"
if ! nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader; then
    echo "gpu_check: nvidia-smi sees no GPU" >&2
    exit 1
fi

if [ "${NO_INSTALL:-0}" = 1 ]; then
    PY=$PYTHON
    if ! "$PY" -c "import segserve_server, segserve_client" 2>/dev/null; then
        export PYTHONPATH="$PWD/server:$PWD/clients${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    step "install segserve[gpu] into $VENV"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PY=$VENV/bin/python
    pip_args=(-q --disable-pip-version-check)
    if [ -n "${WHEELHOUSE:-}" ]; then
        pip_args+=(--no-index --find-links "$WHEELHOUSE")
        # No build isolation offline: the build backend comes from the wheelhouse, into the venv.
        "$PY" -m pip install "${pip_args[@]}" "setuptools>=69" wheel
        pip_args+=(--no-build-isolation)
    fi
    "$PY" -m pip install "${pip_args[@]}" -e ".[gpu]" \
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
for name in ("tensorrt", "torchvision", "pynvml", "polygraphy", "onnxruntime", "onnx"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", exc)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
EOF

step "GPU tests (at most $TESTS_TIMEOUT_S s)"
set +e
timeout -k 10 "$TESTS_TIMEOUT_S" "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/test_device_pipeline.py tests/test_tensorrt.py tests/test_gpu_metrics.py \
    tests/test_ort_iobinding.py tests/test_jpeg_batch.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
set -e
tests_summary=$(tail -n 1 "$OUT_DIR/gpu_tests.log")
case $tests_status in 124 | 137) tests_summary="cut off at $TESTS_TIMEOUT_S s" ;; esac
# -rs folds skips as "SKIPPED [N] file:line: reason" (N tests each); sum the N's.
skipped_for_gpu=$(awk '
    /^SKIPPED/ && /needs CUDA|needs TensorRT|needs a GPU|onnxruntime-gpu|needs torch|imports torch|nvidia-ml-py/ {
        n = 1; if (match($0, /\[[0-9]+\]/)) n = substr($0, RSTART + 1, RLENGTH - 2); total += n
    }
    END { print total + 0 }' "$OUT_DIR/gpu_tests.log")

step "engine build and benchmark ($MODEL on $DEVICE, at most $BENCH_TIMEOUT_S s)"
set +e
# shellcheck disable=SC2086 # BENCH_ARGS is split into arguments on purpose
PYTHONUNBUFFERED=1 timeout -k 15 "$BENCH_TIMEOUT_S" "$PY" benchmarks/gpu_bench.py \
    --model "$MODEL" --device "$DEVICE" \
    --work "${WORK_DIR:-$(mktemp -d)}" --out "$OUT_DIR/gpu_bench.json" ${BENCH_ARGS:-} \
    --note "GPU tests=$tests_summary (exit $tests_status; $skipped_for_gpu skipped for want of a GPU part)"
bench_status=$?
set -e

step "done (tests exit $tests_status, benchmark exit $bench_status)"
if [ "$tests_status" -ne 0 ]; then exit "$tests_status"; fi
exit "$bench_status"
