"""The torchrun example trains a small MoE LM with expert parallelism (2 gloo ranks)."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_expert_parallel.py"


def test_torchrun_example_trains():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(EXAMPLE),
           "--steps", "25", "--log-every", "25", "--batch", "8", "--seq", "64", "--d-model", "32", "--lr", "1e-2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = re.findall(r"step (\d+): loss ([\d.]+).*count exchanges (\d+), pairs crossing ranks ([\d.]+)%", out.stdout)
    assert [int(s[0]) for s in steps] == [1, 25], out.stdout
    first, last = float(steps[0][1]), float(steps[-1][1])
    assert last < first - 0.5, f"loss {first} -> {last}"
    assert all(s[2] == "0" for s in steps), "routes known ahead: no count exchange"
