#!/usr/bin/env bash
# What a session lent a GPU runs there (the device tool's `run`, from the repository root),
# in one call: the kernels' tests on CUDA tensors, then the GPU benchmark. Logs and results go
# to $OUT (or ./gpu-out), to be committed under benchmarks/results/.
#
# The device image has PyTorch, Triton, JAX, pytest and SciPy but not kldiv's other needs.
# Before the call, on the development machine (Python 3.12 wheels for the device):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl array-api-compat liger-kernel torchmetrics lightning-utilities
# and name `.whl` in the call's `carry`.
set -uo pipefail
out="$(realpath -m "${OUT:-gpu-out}")"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null || true
} > "$out/device.txt" 2>&1
# The kernels' tests: with CUDA present, conftest leaves TRITON_INTERPRET unset and the tests
# use CUDA tensors and compiled kernels.
python3 -m pytest -q -x -p no:cacheprovider tests/torch/rows/test_triton.py \
    tests/torch/test_distillation.py tests/torch/test_fused_linear.py \
    tests/torch/test_torchmetrics.py 2>&1 | tee "$out/gpu_tests.log"
tests=$?
(cd benchmarks && python3 bench_distill_gpu.py --out "$out" "$@") 2>&1 | tee "$out/gpu_bench.log"
exit $((tests || $?))
