"""ExpertParallelMoE on 2 and 4 gloo processes against the single-process grouter.nn.MoE.

Each rank holds an uneven share of one global batch (some ranks none); its outputs and input and
gate-weight gradients must equal the single-process ones for its tokens, and each local expert's
gradient the single-process gradient of that expert (summed over every rank's tokens). Every
expert sees the same rows in the same order as in the single process, so with the same thread
count (one, as the ranks run) the results are bitwise equal. The replicated router's gradient is
a sum of per-rank partial gradients (an all-reduce), so it agrees to rounding only.
"""

from pathlib import Path

import pytest
import torch

from ep_cases import CASES, build, run
from launch import run_ranks

from conftest import SEED

WORKER = Path(__file__).with_name("ep_worker.py")


EXACT = dict(rtol=0, atol=0)


def reference(name, world, seed):
    """The single-process MoE on the whole global batch, on one thread like each rank."""
    c, layers, x, ids, w, grad_out, placement = build(name, world, seed)
    x.requires_grad_(True)
    w.requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run(layers, x, lambda i: None if c["mode"] == "router" else (ids, w))
        out.backward(grad_out)
    finally:
        torch.set_num_threads(threads)
    return c, layers, x, w, out.detach(), placement


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """Run every case once per world size (one launch: process start-up dominates)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    run_ranks(world, [str(WORKER), str(out), str(SEED), *CASES])
    return world, out


COMPARED = [name for name in CASES if "mismatch" not in CASES[name]["mode"]]


@pytest.mark.parametrize("name", COMPARED)
def test_matches_single_process(ranks, name):
    world, out_dir = ranks
    c, layers, x, w, out, placement = reference(name, world, SEED)
    tol = EXACT
    bounds = torch.tensor([0] + c["counts"]).cumsum(0).tolist()
    for rank in range(world):
        got = torch.load(out_dir / f"{name}.{rank}.pt")
        mine = slice(bounds[rank], bounds[rank + 1])
        torch.testing.assert_close(got["out"], out[mine], **tol, msg=lambda m: f"rank {rank} output: {m}")
        torch.testing.assert_close(got["x_grad"], x.grad[mine], **tol, msg=lambda m: f"rank {rank} grad x: {m}")
        if c["mode"] != "router":
            torch.testing.assert_close(got["w_grad"], w.grad[mine], **tol, msg=lambda m: f"rank {rank} grad w: {m}")
        for layer, local, (g_gate_up, g_down) in zip(layers, got["local_experts"], got["expert_grads"]):
            assert local == placement[rank].tolist()
            torch.testing.assert_close(g_gate_up, layer.experts.gate_up_proj.grad[local], **tol)
            torch.testing.assert_close(g_down, layer.experts.down_proj.grad[local], **tol)
        for layer, g_router in zip(layers, got.get("router_grads", [])):
            torch.testing.assert_close(g_router, layer.router.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", COMPARED)
def test_count_exchanges(ranks, name):
    """Routes known for the global batch: no count exchange; otherwise one per prepared routing."""
    world, out_dir = ranks
    c = CASES[name]
    layers = c.get("layers", 1)
    expected = {"global": 0, "shared": 1, "exchange": layers, "router": layers}[c["mode"]]
    for rank in range(world):
        got = torch.load(out_dir / f"{name}.{rank}.pt")
        fwd, total = got["forward_stats"], got["stats"]
        assert fwd["count_exchanges"] == total["count_exchanges"] == expected
        assert total["route_checks"] <= 1  # only the first routing planned from global routes
        # Two token all-to-alls per layer forward, two more in backward.
        assert fwd["all_to_alls"] == 2 * layers and total["all_to_alls"] == 4 * layers


@pytest.mark.parametrize("name,message", [("mismatch", "different global_expert_ids"),
                                          ("placement_mismatch", "different placements")])
def test_ranks_that_disagree_all_raise(ranks, name, message):
    """Disagreements gloo would not notice (it exchanges mismatched splits silently) raise on every rank."""
    world, out_dir = ranks
    for rank in range(world):
        error = torch.load(out_dir / f"{name}.{rank}.pt")["error"]
        assert error is not None and message in error, f"rank {rank}: {error}"
