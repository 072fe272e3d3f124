import pytest
import torch

import reference as ref
from grouter import ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [  # (T, K, E, H)
    (0, 2, 4, 8), (3, 2, 4, 0), (1, 1, 1, 1), (17, 3, 3, 5), (64, 8, 8, 33),
    (512, 2, 16, 128), (300, 4, 256, 72), (2048, 2, 16, 1024),
]


def make(T, K, E, H, dtype, device):
    ids = ref.random_routing(T, K, E, device=device)
    return ops.routing_plan(ids, E), torch.randn(T, H, device=device).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H", SHAPES)
def test_forward_matches_reference(T, K, E, H, dtype, device):
    plan, x = make(T, K, E, H, dtype, device)
    out = ops.permute(x, plan)
    assert out.shape == (T * K, H) and out.dtype == dtype
    assert torch.equal(out, ref.permute(x, plan.row_of))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,H", SHAPES)
def test_backward_is_gather_sum(T, K, E, H, dtype, device):
    plan, x = make(T, K, E, H, dtype, device)
    x.requires_grad_(True)
    g = torch.randn(T * K, H, device=device).to(dtype)
    ops.permute(x, plan).backward(g)
    assert torch.equal(x.grad, ref.unpermute(g, plan.row_of))  # fp32 sum in k order


def test_gradcheck():
    plan, x = make(13, 3, 5, 7, torch.float64, "cpu")
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, plan), (x,))


def test_non_contiguous_input(device):
    plan, x = make(100, 2, 8, 64, torch.float32, device)
    xt = x.T.contiguous().T  # same values, column-major
    assert torch.equal(ops.permute(xt, plan), ref.permute(x, plan.row_of))
    assert torch.equal(ops.permute(x[:, ::2], plan), ref.permute(x[:, ::2], plan.row_of))


@pytest.mark.parametrize("dtype,H", [(torch.float32, 1040), (torch.bfloat16, 2083)])
def test_large_output(dtype, H, device):
    # > 16 MiB of output: the CPU streams rows whose size is a multiple of 16 bytes (H=1040 fp32)
    # and falls back to memcpy otherwise (H=2083 bf16).
    plan, x = make(4096, 4, 16, H, dtype, device)
    assert torch.equal(ops.permute(x, plan), ref.permute(x, plan.row_of))
