#!/usr/bin/env bash
# One command for a lent GPU machine: build grouter with its CUDA backend, run the CUDA tests,
# time every op (bench/gpu_bench.py) and print one table. Logs go under $OUT when it is set.
# Needs no network: torch, nvcc, cmake, ninja, pybind11 and pytest must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100/H200; one arch keeps the build short

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"

start=$(date +%s)
if ! GROUTER_CUDA=1 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED (log: $OUT/build.log)"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

start=$(date +%s)
python -m pytest tests -q -k cuda -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
echo "tests: $(( $(date +%s) - start )) s, exit $tests_rc"

python bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
