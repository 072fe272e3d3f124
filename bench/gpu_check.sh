#!/usr/bin/env bash
# One command for a lent GPU machine: record the machine, build grouter with its CUDA backend
# against whatever torch is installed, run the CUDA tests with a fixed and a random seed, run
# compute-sanitizer (memcheck, racecheck) over every op when it is installed, time every op
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
  echo "arch $TORCH_CUDA_ARCH_LIST, python $PY, compute-sanitizer: $(command -v compute-sanitizer || echo none)"
} 2>&1 | tee "$OUT/machine.txt"

start=$(date +%s)
GROUTER_CUDA=1 timeout "$(budget 170)" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
step build $(( $(date +%s) - start )) $rc
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED (log: $OUT/build.log)"; exit 1; fi

for seed in 0 $RANDOM$RANDOM; do
  enough 30 "tests (GROUTER_TEST_SEED=$seed)" || continue
  start=$(date +%s)
  GROUTER_TEST_SEED=$seed timeout "$(budget 80)" "$PY" -m pytest tests -q -k cuda -p no:cacheprovider > "$OUT/tests_seed$seed.log" 2>&1
  rc=$?
  tail -1 "$OUT/tests_seed$seed.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_seed$seed.log" | head -20
  step "tests (GROUTER_TEST_SEED=$seed)" $(( $(date +%s) - start )) $rc
done

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    enough 20 "compute-sanitizer $tool" || continue
    start=$(date +%s)
    timeout "$(budget 45)" compute-sanitizer --tool $tool --error-exitcode 3 "$PY" bench/sanitize_ops.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -2 "$OUT/sanitizer_$tool.log"
    step "compute-sanitizer $tool" $(( $(date +%s) - start )) $rc
  done
else
  echo "== compute-sanitizer: not installed, skipped"
fi

enough 20 bench || exit "$status"
start=$(date +%s)
timeout "$(budget 90)" "$PY" bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
step bench $(( $(date +%s) - start )) "${PIPESTATUS[0]}"
exit $status
