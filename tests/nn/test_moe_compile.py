"""torch.compile(fullgraph=True) of grouter.nn.MoE with each router: one graph, no recompiles as
the per-expert counts change from batch to batch, and the same results as eager."""

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from grouter import nn as gnn


@pytest.mark.parametrize("router", ["softmax", "sigmoid", None])
def test_compiles_once_and_matches_eager(router):
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    torch.manual_seed(0)
    eager = gnn.MoE(32, 16, 8, 2, router=router)
    compiled_moe = gnn.MoE(32, 16, 8, 2, router=router)
    compiled_moe.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_moe, fullgraph=True, backend="aot_eager")
    for _ in range(3):  # other tokens, other per-expert counts
        x = torch.randn(40, 32)
        ids, w = torch.rand(40, 8).argsort(1)[:, :2], torch.rand(40, 2)
        kw = {} if router else dict(routing=(ids, w))
        outs = []
        for moe, run in ((eager, eager), (compiled_moe, compiled)):
            xi = x.clone().requires_grad_(True)
            out = run(xi, **kw)
            loss = out.square().sum() + (0.01 * moe.aux_loss if moe.aux_loss is not None else 0)
            grads = torch.autograd.grad(loss, [xi, *moe.parameters()])
            outs.append((out.detach(), grads))
        (out_e, grads_e), (out_c, grads_c) = outs
        torch.testing.assert_close(out_c, out_e)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b)
    if router == "sigmoid":  # the load counted inside the compiled forward, as in eager
        assert torch.equal(compiled_moe.router.expert_load, eager.router.expert_load)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
    assert sum(dynamo_utils.counters["recompiles"].values()) == 0
