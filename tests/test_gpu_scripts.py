"""The GPU check's scripts stay runnable where there is no GPU to run them on: the sanitizer's
workload runs on the CPU kernels, and gpu_check.sh parses."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sanitize_ops_runs_on_the_cpu():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_ops.py"), "cpu"], capture_output=True, text=True)
    assert r.returncode == 0 and "sanitize_ops: done" in r.stdout, r.stderr[-2000:]


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
