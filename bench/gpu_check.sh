#!/usr/bin/env bash
# One command for a lent GPU machine: record the machine, build grouter with its CUDA backend
# against whatever torch is installed, run the CUDA tests with a fixed and a random seed, run
# compute-sanitizer (memcheck, racecheck) over every op when it is installed, time every op
# (bench/gpu_bench.py) and print one table. Everything is written under $OUT. Each stage has a
# timeout (11.5 minutes in all at worst); not yet run on a GPU.
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
step() { echo "== $1: $2 s, exit $3"; [ "$3" -eq 0 ] || status=$3; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" --version
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -1
  echo "arch $TORCH_CUDA_ARCH_LIST, python $PY, compute-sanitizer: $(command -v compute-sanitizer || echo none)"
} 2>&1 | tee "$OUT/machine.txt"

start=$(date +%s)
GROUTER_CUDA=1 timeout 240 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
step build $(( $(date +%s) - start )) $rc
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; echo "BUILD FAILED (log: $OUT/build.log)"; exit 1; fi

for seed in 0 $RANDOM$RANDOM; do
  start=$(date +%s)
  GROUTER_TEST_SEED=$seed timeout 100 "$PY" -m pytest tests -q -k cuda -p no:cacheprovider > "$OUT/tests_seed$seed.log" 2>&1
  rc=$?
  tail -1 "$OUT/tests_seed$seed.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_seed$seed.log" | head -20
  step "tests (GROUTER_TEST_SEED=$seed)" $(( $(date +%s) - start )) $rc
done

if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    start=$(date +%s)
    timeout 75 compute-sanitizer --tool $tool --error-exitcode 3 "$PY" bench/sanitize_ops.py > "$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    tail -2 "$OUT/sanitizer_$tool.log"
    step "compute-sanitizer $tool" $(( $(date +%s) - start )) $rc
  done
else
  echo "== compute-sanitizer: not installed, skipped"
fi

start=$(date +%s)
timeout 100 "$PY" bench/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
step bench $(( $(date +%s) - start )) "${PIPESTATUS[0]}"
exit $status
