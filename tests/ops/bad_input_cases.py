"""Bad inputs for every op, with the exception each must raise and a word its message must name.

Run as a script it executes every case (in the process that test_bad_input.py starts, so a crash
cannot take pytest down) and prints one JSON line per case as soon as the case has finished.
"""

import json
import os
import sys

import torch

from grouter import ops

# Every tensor below is made on this device (the CUDA run sets it to "cuda").
torch.set_default_device(os.environ.get("GROUTER_TEST_DEVICE", "cpu"))

E = 8
ok_ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
ok_plan = ops.routing_plan(ok_ids, E)
x = torch.randn(3, 4)
y = torch.randn(6, 4)
w = torch.rand(3, 2)


def plan_with(row_of):
    return ops.RoutingPlan(ok_plan.sorted_tokens, row_of, ok_plan.expert_offsets)


def dup_ids(K):
    ids = torch.arange(K).repeat(4, 1)
    ids[2, K - 1] = ids[2, 0]
    return ids


# name: (call, accepted exception types, word the message must contain)
CASES = {
    "plan/id_too_large": (lambda: ops.routing_plan(torch.tensor([[0, 8]]), E), IndexError, "outside"),
    "plan/id_negative": (lambda: ops.routing_plan(torch.tensor([[0, 1], [-1, 2]]), E), IndexError, "outside"),
    "plan/id_huge_int64": (lambda: ops.routing_plan(torch.tensor([[2**40, 1]]), E), IndexError, "outside"),
    "plan/id_huge_int32": (lambda: ops.routing_plan(torch.tensor([[0, 2**31 - 1]], dtype=torch.int32), E), IndexError, "outside"),
    "plan/repeated_expert": (lambda: ops.routing_plan(torch.tensor([[0, 1], [3, 3]]), E), ValueError, "repeats"),
    "plan/repeated_expert_large_k": (lambda: ops.routing_plan(dup_ids(40), 64), ValueError, "repeats"),
    "plan/k_greater_than_e": (lambda: ops.routing_plan(torch.tensor([[0, 1, 2]]), 2), ValueError, "exceeds"),
    "plan/zero_experts": (lambda: ops.routing_plan(torch.zeros(0, 1, dtype=torch.long), 0), ValueError, "num_experts"),
    "plan/negative_experts": (lambda: ops.routing_plan(ok_ids, -4), ValueError, "num_experts"),
    "plan/float_num_experts": (lambda: ops.routing_plan(ok_ids, 8.0), ValueError, "num_experts"),
    "plan/float_ids": (lambda: ops.routing_plan(ok_ids.float(), E), ValueError, "int32 or int64"),
    "plan/int16_ids": (lambda: ops.routing_plan(ok_ids.short(), E), ValueError, "int32 or int64"),
    "plan/1d_ids": (lambda: ops.routing_plan(torch.tensor([0, 1, 2]), E), ValueError, "2-D"),
    "plan/3d_ids": (lambda: ops.routing_plan(ok_ids[None], E), ValueError, "2-D"),
    "plan/raw_op_bad_id": (lambda: torch.ops.grouter.routing_plan(torch.tensor([[9]]), 4), IndexError, "outside"),
    "coact/id_too_large": (lambda: ops.coactivation(torch.tensor([[0, 9]]), E), IndexError, "outside"),
    "coact/id_negative": (lambda: ops.coactivation(torch.tensor([[-5, 1]]), E), IndexError, "outside"),
    "coact/repeated_expert": (lambda: ops.coactivation(torch.tensor([[2, 2]]), E), ValueError, "repeats"),
    "coact/k_greater_than_e": (lambda: ops.coactivation(torch.tensor([[0, 1]]), 1), ValueError, "exceeds"),
    "coact/zero_experts": (lambda: ops.coactivation(torch.zeros(0, 0, dtype=torch.long), 0), ValueError, "num_experts"),
    "coact/float_ids": (lambda: ops.coactivation(ok_ids.double(), E), ValueError, "int32 or int64"),
    "coact/1d_ids": (lambda: ops.coactivation(torch.tensor([1, 2]), E), ValueError, "2-D"),
    "permute/x_1d": (lambda: ops.permute(torch.randn(3), ok_plan), ValueError, "2-D"),
    "permute/x_3d": (lambda: ops.permute(torch.randn(3, 4, 1), ok_plan), ValueError, "2-D"),
    "permute/x_int": (lambda: ops.permute(torch.ones(3, 4, dtype=torch.long), ok_plan), ValueError, "float"),
    "permute/x_wrong_tokens": (lambda: ops.permute(torch.randn(4, 4), ok_plan), ValueError, "tokens"),
    "permute/row_of_int64": (lambda: ops.permute(x, plan_with(ok_plan.row_of.long())), ValueError, "int32"),
    "permute/row_of_out_of_range": (lambda: ops.permute(x, plan_with(ok_plan.row_of + 3)), IndexError, "outside"),
    "permute/row_of_negative": (lambda: ops.permute(x, plan_with(ok_plan.row_of - 1)), IndexError, "outside"),
    "permute/row_of_huge": (lambda: ops.permute(x, plan_with(torch.full((3, 2), 2**31 - 1, dtype=torch.int32))), IndexError, "outside"),
    "permute/row_of_repeats_row": (lambda: ops.permute(x, plan_with(torch.zeros(3, 2, dtype=torch.int32))), ValueError, "twice"),
    "permute/row_of_1d": (lambda: ops.permute(x, plan_with(ok_plan.row_of.reshape(-1))), ValueError, "2-D"),
    "permute/not_a_plan": (lambda: ops.permute(x, "plan"), TypeError, "RoutingPlan"),
    "unpermute/y_wrong_rows": (lambda: ops.unpermute(torch.randn(5, 4), ok_plan, w), ValueError, "rows"),
    "unpermute/y_1d": (lambda: ops.unpermute(torch.randn(6), ok_plan, w), ValueError, "2-D"),
    "unpermute/y_int": (lambda: ops.unpermute(torch.ones(6, 4, dtype=torch.int32), ok_plan, w), ValueError, "float"),
    "unpermute/weights_shape": (lambda: ops.unpermute(y, ok_plan, torch.rand(3, 3)), ValueError, "weights"),
    "unpermute/weights_1d": (lambda: ops.unpermute(y, ok_plan, torch.rand(6)), ValueError, "weights"),
    "unpermute/weights_int": (lambda: ops.unpermute(y, ok_plan, torch.ones(3, 2, dtype=torch.long)), ValueError, "weights"),
    "unpermute/row_of_out_of_range": (lambda: ops.unpermute(y, plan_with(ok_plan.row_of * 7), w), IndexError, "outside"),
    "unpermute/row_of_negative": (lambda: ops.unpermute(y, plan_with(-ok_plan.row_of - 1), None), IndexError, "outside"),
    "unpermute_backward/grad_out_rows": (
        lambda: torch.ops.grouter.unpermute_backward(torch.randn(4, 4), ok_plan.row_of, w, y), ValueError, "rows"),
    "unpermute_backward/y_dtype": (
        lambda: torch.ops.grouter.unpermute_backward(torch.randn(3, 4), ok_plan.row_of, w, y.double()), ValueError, "match"),
    "unpermute_backward/row_of_out_of_range": (
        lambda: torch.ops.grouter.unpermute_backward(torch.randn(3, 4), ok_plan.row_of + 6, w, y), IndexError, "outside"),
    "unpermute_backward/unweighted_names_itself": (
        lambda: torch.ops.grouter.unpermute_backward(torch.randn(3, 4), ok_plan.row_of + 6, None, None), IndexError,
        "unpermute_backward"),
    # Out of range wins over repeated, on every backend (issue 16): [[0, 0], [99, 1]] names 99.
    "unpermute/range_before_repeat": (
        lambda: ops.unpermute(torch.randn(4, 4), plan_with(torch.tensor([[0, 0], [99, 1]], dtype=torch.int32)), None),
        IndexError, "row 99"),
    # Argument types and sizes the C++ schema would reject with an unhelpful RuntimeError, or that
    # would ask for more memory than any machine has.
    "plan/experts_beyond_int64": (lambda: ops.routing_plan(ok_ids, -2**70), ValueError, "num_experts"),
    "plan/experts_2_64": (lambda: ops.routing_plan(ok_ids, 2**64), ValueError, "num_experts"),
    "plan/experts_cannot_fit": (lambda: ops.routing_plan(torch.tensor([[0]]), 2**31 - 1), ValueError, "num_experts"),
    "coact/experts_2_64": (lambda: ops.coactivation(ok_ids, 2**64), ValueError, "num_experts"),
    "coact/experts_cannot_fit": (lambda: ops.coactivation(ok_ids, 100_000), ValueError, "num_experts"),
    "plan/ids_none": (lambda: ops.routing_plan(None, E), ValueError, "expert_ids"),
    "plan/ids_list": (lambda: ops.routing_plan([[0, 1]], E), ValueError, "expert_ids"),
    "plan/ids_sparse": (lambda: ops.routing_plan(ok_ids.to_sparse(), E), ValueError, "strided"),
    "coact/ids_list": (lambda: ops.coactivation([[0, 1]], E), ValueError, "expert_ids"),
    "unpermute/weights_float": (lambda: ops.unpermute(y, ok_plan, 0.5), ValueError, "weights"),
    "permute/x_list": (lambda: ops.permute([[1.0]], ok_plan), ValueError, "x"),
    "unpermute/weights_on_meta": (lambda: ops.unpermute(y, ok_plan, w.to("meta")), ValueError, "devices"),
    "permute/row_of_on_meta": (lambda: ops.permute(x, plan_with(ok_plan.row_of.to("meta"))), ValueError, "devices"),
}


if __name__ == "__main__":
    for name, (call, _, _) in CASES.items():
        try:
            call()
            result = {"name": name, "raised": None, "message": ""}
        except Exception as e:  # noqa: BLE001 - recording what was raised is the point
            result = {"name": name, "raised": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "message": str(e)}
        print(json.dumps(result), flush=True)
    sys.exit(0)
