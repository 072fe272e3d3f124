"""Wrapping MoE layers for expert parallelism: ranks that disagree all raise (none waits), and the
layer builds from the meta device (FSDP2's init flow)."""

from pathlib import Path

import pytest
import torch

from init_worker import single
from launch import run_ranks

WORKER = Path(__file__).with_name("init_worker.py")


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_with_another_expert_count_raises_on_every_rank(tmp_path, world):
    run_ranks(world, [str(WORKER), str(tmp_path), "mismatch"], timeout=120)
    errors = [torch.load(tmp_path / f"mismatch.{r}.pt")["error"] for r in range(world)]
    assert all(e is not None for e in errors), errors
    assert "different sizes" in errors[0] and "is invalid" in errors[0]
    assert "9" in errors[-1]  # the rank that failed says why


def test_built_on_meta_then_materialised_equals_one_process(tmp_path):
    world = 2
    run_ranks(world, [str(WORKER), str(tmp_path), "meta"], timeout=120)
    moe, x, ids, w = single()
    x.requires_grad_(True)
    y = moe(x, routing=(ids, w))
    y.sum().backward()
    ranks = [torch.load(tmp_path / f"meta.{r}.pt") for r in range(world)]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad)
    for r in ranks:
        torch.testing.assert_close(r["down_grad"], moe.experts.down_proj.grad[r["local"]])
