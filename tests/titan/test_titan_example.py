"""examples/train_titan_predispatch.py as a user runs it: one process, then 2 gloo ranks (torchrun's
environment) on the same routes folder: the same losses, and every MoE layer equal to grouter.nn.MoE."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from launch import run_ranks  # noqa: E402

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "train_titan_predispatch.py")


def _losses(output: str):
    return [float(x) for x in re.findall(r"^step \d+: loss ([0-9.]+)$", output, re.M)]


def test_the_example_trains_the_same_on_one_and_two_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, EXAMPLE, "--out", str(tmp_path), "--steps", "3"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = run_ranks(2, [EXAMPLE, "--out", str(tmp_path), "--steps", "3"], timeout=300)  # reuses the routes
    assert len(_losses(one.stdout)) == 3
    assert _losses(two[0]) == pytest.approx(_losses(one.stdout), abs=2e-4)  # printed to 4 decimals
    for out in [one.stdout, *two]:
        diffs = re.findall(r"max \|converted - grouter.nn.MoE\| over 2 layers: (\S+)", out)
        assert diffs and float(diffs[0]) <= 1e-5, out[-1500:]
