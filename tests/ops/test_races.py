"""Index tensors changed by another thread while an op runs: an exception or a result, never a crash."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_concurrent_writes_to_indices_never_crash():
    proc = subprocess.run([sys.executable, str(HERE / "race_cases.py")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])
