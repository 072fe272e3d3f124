#!/usr/bin/env bash
# One command for a lent GPU machine: record the machine, build grouter with its CUDA backend
# against whatever torch is installed, run tests/ops/test_cuda.py in full (a skip fails) and the
# other CUDA tests, run compute-sanitizer (memcheck without the caching allocator, racecheck) over
# grouter's kernels when it is found, time every op
# (bench/gpu_bench.py) and print one table. Everything is written under $OUT. Each stage has a
# timeout and the whole script a deadline (GPU_CHECK_SECONDS, default 470: under 8 minutes); a
# stage that would start past it is skipped and says so. Not yet run on a GPU.
# Needs no network: torch, nvcc, cmake, ninja, pybind11 and pytest must already be there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The device's own architecture only: one arch keeps the build short.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)}
status=0
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))
step() { echo "== $1: $2 s, exit $3"; [ "$3" -eq 0 ] || status=$3; }
# A stage's timeout: its own budget, or what is left before the deadline if that is less.
budget() { local left=$(( deadline - $(date +%s) )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
enough() { [ "$(budget "$1")" -ge 10 ] || { echo "== $2: skipped, the deadline is near"; status=4; return 1; }; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" --version
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
  echo "arch $TORCH_CUDA_ARCH_LIST, python $PY, compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || echo none)"
} 2>&1 | tee "$OUT/machine.txt"

start=$(date +%s)
GROUTER_CUDA=1 timeout "$(budget 170)" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
step build $(( $(date +%s) - start )) $rc
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED (log: $OUT/build.log)"; exit 1; fi

# Tests in stages that fit: the CUDA op tests in full (every skip reported, and a skip there
# means the CUDA build is not in use: a failure), then the other CUDA tests with a random seed.
# -rfEs prints FAILED/ERROR/SKIPPED lines in the summary; a stage killed by its timeout says so.
run_tests() {  # name, budget, pytest arguments...
  local name=$1 secs=$2; shift 2
  enough 30 "$name" || return
  local start=$(date +%s) log="$OUT/tests_${name// /_}.log"
  timeout "$(budget "$secs")" "$PY" -m pytest -q -rfEs -p no:cacheprovider "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "TIMED OUT ($log)"
  tail -1 "$log"
  grep -E "^(FAILED|ERROR)" "$log" | head -20
  step "tests: $name" $(( $(date +%s) - start )) $rc
  if [ "$name" = "cuda ops" ] && grep -qE "^SKIPPED" "$log"; then
    echo "tests/ops/test_cuda.py skipped tests on a GPU machine:"; grep -E "^SKIPPED" "$log" | head -5; status=5
  fi
}
GROUTER_TEST_SEED=0 run_tests "cuda ops" 100 tests/ops/test_cuda.py
seed=$RANDOM$RANDOM
GROUTER_TEST_SEED=$seed run_tests "ops on cuda" 90 tests/ops -k cuda --ignore=tests/ops/test_cuda.py
GROUTER_TEST_SEED=$seed run_tests "nn and hf on cuda" 60 tests/nn tests/hf -k cuda
GROUTER_TEST_SEED=$seed run_tests "router and parallel on cuda" 60 tests/router tests/parallel -k cuda

# compute-sanitizer: on PATH or in the CUDA toolkit; without the caching allocator (an access
# past a tensor inside a cached block would be invisible) and on grouter's kernels only.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SAN" ]; then
  for tool in memcheck racecheck; do
    enough 20 "compute-sanitizer $tool" || continue
    start=$(date +%s)
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(budget 60)" "$SAN" --tool $tool --kernel-name kns=grouter \
      --error-exitcode 3 "$PY" bench/sanitize_ops.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -2 "$OUT/sanitizer_$tool.log"
    step "compute-sanitizer $tool" $(( $(date +%s) - start )) $rc
  done
else
  echo "== compute-sanitizer: not found (PATH, /usr/local/cuda/bin), skipped"
fi

enough 20 bench || exit "$status"
start=$(date +%s)
timeout "$(budget 60)" "$PY" bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
step bench $(( $(date +%s) - start )) "${PIPESTATUS[0]}"
exit $status
