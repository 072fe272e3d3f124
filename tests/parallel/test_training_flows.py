"""Expert x data parallelism in the flows large-model training takes, against one process.

Module surgery after sharding (`to(dtype)`, `load_state_dict(assign=True)`, `to_empty` + a full
state, `reset_parameters`, parametrizations), meta-device init, FSDP2 mixed precision, a mesh that
lists ranks out of order, the softmax router's loss terms (with a rank without tokens), and misuse
that must raise on every rank. 2 gloo ranks: a 1-D expert-parallel mesh; 4: ("dp", "ep") = 2 x 2.
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import dp_cases as cases  # noqa: E402
from launch import run_ranks  # noqa: E402

SEED = 5
SURGERY = ("to_dtype", "assign", "to_empty", "reset", "parametrize")
EXACT = (*SURGERY, "meta")
BF16 = ("bf16", "bf16_fp32_reduce")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("flows")
    worker = str(HERE / "flows_worker.py")
    run_ranks(2, [worker, str(out), str(SEED), *EXACT, *BF16, "reversed_mesh", "ragged", "order_mismatch"])
    run_ranks(4, [worker, str(out), str(SEED), *EXACT, *BF16, "reversed_mesh", "ep_submesh", "order_mismatch"])

    def load(name, world):
        return [torch.load(out / f"{name}.{world}.{r}.pt", weights_only=False) for r in range(world)]

    load.dir = out
    return load


def one_process(optimizer="sgd", clip=None, forward=None):
    model = cases.build(SEED)
    history = cases.train(model, optimizer, SEED, 1, 0, lambda s, n: s / n, clip,
                          forward=forward(model) if forward else None)
    return model, history


def assert_equal_to_one_process(ranks, model, history, atol=1e-6, rel=1e-6):
    for step, (loss, norm) in enumerate(history):
        assert sum(r["history"][step][0] for r in ranks) == pytest.approx(loss, rel=rel, abs=atol)
    want = cases.full_state(model)
    for r in ranks:
        for key, grad in r["grads"].items():
            scale = max(1.0, float(model.first_grads[key].abs().max()))
            torch.testing.assert_close(grad, model.first_grads[key], rtol=0, atol=atol * scale, msg=key)
        assert r["state"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(r["state"][key], value, rtol=0, atol=atol, msg=key)


def assert_replicas_equal(ranks, field="replica"):
    """On 2 x 2, ranks 0 and 2 (and 1 and 3) hold the same experts: data-parallel replicas."""
    if len(ranks) == 4:
        for a, b in ((0, 2), (1, 3)):
            for key in ranks[a][field]:
                assert torch.equal(ranks[a][field][key], ranks[b][field][key]), (field, key)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", EXACT)
def test_flow_trains_as_one_process(results, name, world):
    # Surgery after sharding and meta-device init change nothing numerically.
    optimizer, clip = ("adamw", 0.5) if name == "meta" else ("sgd", None)
    model, history = one_process(optimizer, clip)
    ranks = results(name, world)
    assert_equal_to_one_process(ranks, model, history)
    assert_replicas_equal(ranks)
    if name == "reset":
        assert_replicas_equal(ranks, "after_reset")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", BF16)
def test_bf16_mixed_precision_equals_one_process_in_bf16(results, name, world):
    # bf16 compute from fp32 parameters: one process computing the same way, within bf16's
    # precision (losses 1e-2 relative, gradients and weights 2e-2 of their scale); parameters
    # stay fp32 and the data-parallel replicas stay bitwise equal.
    model, history = one_process(forward=cases.bf16_forward)
    ranks = results(name, world)
    assert all(r["dtypes"] == ["torch.float32"] for r in ranks)
    assert_equal_to_one_process(ranks, model, history, atol=2e-2, rel=1e-2)
    assert_replicas_equal(ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_a_mesh_listing_ranks_out_of_order_shards_by_mesh_coordinate(results, world):
    import torch.distributed.checkpoint as dcp

    ranks = results("reversed_mesh", world)
    # The rank at "ep" coordinate 0 is the second of each line: it hosts experts 0..3.
    firsts = [r["local_experts"][0] for r in ranks]
    assert firsts == ([4, 0] if world == 2 else [4, 0, 4, 0])
    # FSDP2 shards by process-group rank and DCP places shards by mesh coordinate: refused.
    assert all("lists ranks out of order" in r["fsdp_error"] for r in ranks)
    model, history = one_process()
    for step, (loss, _) in enumerate(history):
        assert sum(r["history"][step][0] for r in ranks) == pytest.approx(loss, rel=1e-6)
    fresh = cases.build(SEED + 1)
    state = fresh.state_dict()
    dcp.load(state, checkpoint_id=str(results.dir / f"reversed.{world}"))
    fresh.load_state_dict(state)
    for key, value in model.state_dict().items():  # expert rows where they belong
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_misuse_raises_on_every_rank(results):
    for r in results("ep_submesh", 4):
        assert "spans 2 of the 4 ranks" in r["error"] and "mesh['ep']" in r["error"], r["error"]
    for r in results("ragged", 2):
        assert "placement [[0, 1, 2], [3, 4, 5, 6, 7]] is not a table" in r["error"], r["error"]
    for world in (2, 4):
        errors = [r["error"] for r in results("order_mismatch", world)]
        assert all(e and "expert orders" in e for e in errors), errors
