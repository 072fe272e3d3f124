"""The torchrun example trains a small MoE LM with expert parallelism (2 gloo ranks) and expert x
data parallelism (4 ranks), and resumes from its DCP checkpoint on another number of ranks."""

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_expert_parallel.py"


def torchrun(ranks, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(EXAMPLE),
           "--batch", "8", "--seq", "64", "--d-model", "32", "--lr", "1e-2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def last_loss(stdout):
    return float(re.findall(r"this step ([\d.]+)", stdout)[-1])


def test_torchrun_example_trains():
    stdout = torchrun(2, "--steps", "25", "--log-every", "25")
    steps = re.findall(r"step (\d+): loss ([\d.]+).*count exchanges (\d+), pairs crossing ranks ([\d.]+)%", stdout)
    assert [int(s[0]) for s in steps] == [1, 25], stdout
    first, last = float(steps[0][1]), float(steps[-1][1])
    assert last < first - 0.5, f"loss {first} -> {last}"
    assert all(s[2] == "0" for s in steps), "routes known ahead: no count exchange"


def test_ep_x_dp_checkpoint_resumes_on_another_world_size(tmp_path):
    # 2 EP x 2 DP for 3 steps, saved (DCP), resumed on 2 ranks (EP only) for 3 more: the same
    # training as 6 steps in one go on 4 ranks (the global batch and its mean do not depend on the layout).
    straight = last_loss(torchrun(4, "--dp", "2", "--steps", "6", "--log-every", "6"))
    torchrun(4, "--dp", "2", "--steps", "3", "--save", str(tmp_path / "ckpt"))
    resumed = torchrun(2, "--steps", "3", "--log-every", "6", "--resume", str(tmp_path / "ckpt"))
    assert "resumed at step 3" in resumed
    assert abs(last_loss(resumed) - straight) < 1e-4, (last_loss(resumed), straight)
