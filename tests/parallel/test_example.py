"""The torchrun example trains a small MoE LM with expert parallelism (2 gloo ranks) and expert x
data parallelism (4 ranks), built on the meta device; it resumes from its DCP checkpoint on 1, 2
and 4 expert-parallel ranks (affinity placements number the experts differently for each size:
the checkpoint's numbering is restored), and trains in bf16 under an FSDP2 mixed-precision policy."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_expert_parallel.py"
MODEL = dict(d_model=32, layers=2, experts=8, top_k=2)


def torchrun(ranks, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(EXAMPLE),
           "--batch", "8", "--seq", "64", "--d-model", "32", "--lr", "1e-2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def last_loss(stdout):
    return float(re.findall(r"this step ([\d.]+)", stdout)[-1])


def saved_weights(path):
    """A DCP checkpoint's model, loaded in one process into the plain (single-process) model."""
    import torch.distributed.checkpoint as dcp
    from grouter.demo.lm import MoELM

    model = MoELM(MODEL["d_model"], MODEL["layers"], 4, MODEL["experts"], MODEL["top_k"], MODEL["d_model"], 0)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.load(state, checkpoint_id=str(path))
    return state


def test_torchrun_example_trains():
    stdout = torchrun(2, "--steps", "25", "--log-every", "25")
    steps = re.findall(r"step (\d+): loss ([\d.]+).*count exchanges (\d+), pairs crossing ranks ([\d.]+)%", stdout)
    assert [int(s[0]) for s in steps] == [1, 25], stdout
    first, last = float(steps[0][1]), float(steps[-1][1])
    assert last < first - 0.5, f"loss {first} -> {last}"
    assert all(s[2] == "0" for s in steps), "routes known ahead: no count exchange"


def test_trains_in_bf16_mixed_precision():
    steps = re.findall(r"step (\d+): loss ([\d.]+)", torchrun(2, "--bf16", "--steps", "25", "--log-every", "25"))
    assert float(steps[-1][1]) < float(steps[0][1]) - 0.5, steps


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_checkpoint_resumes_on_1_2_and_4_expert_parallel_ranks(tmp_path):
    # 2 EP x 2 DP with an affinity placement for 3 steps, saved (DCP), resumed on 1, 2 and 4 EP
    # ranks for 3 more: the same training as 6 steps in one go (the global batch and its mean do
    # not depend on the layout), though each size's affinity placement numbers experts differently.
    straight = last_loss(torchrun(4, "--dp", "2", "--steps", "6", "--log-every", "6", "--save", str(tmp_path / "6")))
    torchrun(4, "--dp", "2", "--steps", "3", "--save", str(tmp_path / "3"))
    want = saved_weights(tmp_path / "6")
    for ranks in (1, 2, 4):
        out = tmp_path / f"resumed{ranks}"
        resumed = torchrun(ranks, "--steps", "3", "--log-every", "6", "--resume", str(tmp_path / "3"), "--save", str(out))
        assert "resumed at step 3" in resumed
        assert abs(last_loss(resumed) - straight) < 1e-4, (ranks, last_loss(resumed), straight)
        for key, value in saved_weights(out).items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-5, msg=f"{ranks} ranks: {key}")
