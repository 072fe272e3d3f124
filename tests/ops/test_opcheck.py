"""torch.library.opcheck for every op, and the ops inside torch.compile(fullgraph=True)."""

import pytest
import torch

import reference as ref
from grouter import ops


def samples(device):
    ids = ref.random_routing(40, 3, 8, device=device)
    plan = ops.routing_plan(ids, 8)
    x = torch.randn(40, 16, device=device, requires_grad=True)
    y = torch.randn(120, 16, device=device, requires_grad=True)
    w = torch.rand(40, 3, device=device, requires_grad=True)
    return ids, plan, x, y, w


def test_opcheck_routing_plan(device):
    ids, *_ = samples(device)
    torch.library.opcheck(torch.ops.grouter.routing_plan.default, (ids, 8))
    torch.library.opcheck(torch.ops.grouter.routing_plan.default, (ids[:0], 8))


def test_opcheck_coactivation(device):
    ids, *_ = samples(device)
    torch.library.opcheck(torch.ops.grouter.coactivation.default, (ids.int(), 8))


def test_opcheck_permute(device):
    _, plan, x, _, _ = samples(device)
    torch.library.opcheck(torch.ops.grouter.permute.default, (x, plan.row_of))


@pytest.mark.parametrize("weighted", [True, False])
def test_opcheck_unpermute(weighted, device):
    _, plan, _, y, w = samples(device)
    torch.library.opcheck(torch.ops.grouter.unpermute.default, (y, plan.row_of, w if weighted else None))


def test_opcheck_unpermute_backward(device):
    _, plan, _, y, w = samples(device)
    g = torch.randn(40, 16, device=device)
    op = torch.ops.grouter.unpermute_backward.default
    torch.library.opcheck(op, (g, plan.row_of, w.detach(), y.detach()))
    torch.library.opcheck(op, (g, plan.row_of, w.detach(), None))
    torch.library.opcheck(op, (g, plan.row_of, None, None))


def moe_dispatch(x, ids, weights):
    plan = ops.routing_plan(ids, 8)
    rows = ops.permute(x, plan)
    rows = torch.nn.functional.silu(rows) * 2.0
    return ops.unpermute(rows, plan, weights)


def test_compile_fullgraph(device):
    ids, _, x, _, _ = samples(device)
    w = torch.rand(40, 3, device=device, requires_grad=True)
    compiled = torch.compile(moe_dispatch, fullgraph=True)
    out = compiled(x, ids, w)
    out.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    expected = moe_dispatch(x, ids, w)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
