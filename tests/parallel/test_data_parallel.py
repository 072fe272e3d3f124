"""Expert parallelism x data parallelism (FSDP2 on the dense parts) against one process.

2 gloo ranks: a 1-D expert-parallel mesh; 4 ranks: ("dp", "ep") = 2 x 2. Uneven token splits,
the global_mean loss convention; SGD, AdamW with clipping, the sigmoid router's bias, and DCP
checkpoints saved on 2 ranks loaded on 2, on 4 and in one process.
"""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import dp_cases as cases  # noqa: E402
from launch import run_ranks  # noqa: E402

SEED = 3
TRAIN_CASES = tuple(cases.TRAINING)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    worker = str(HERE / "dp_worker.py")
    run_ranks(2, [worker, str(out), str(SEED), *TRAIN_CASES, "dcp_save", "dcp_load", "ddp_attached",
                         "global_aux", "ddp_around_ep", "dp_softmax", "fsdp_attached", "fsdp_attached_bf16"])
    run_ranks(4, [worker, str(out), str(SEED), *TRAIN_CASES, "dcp_load", "dp_softmax"])

    def load(name, world):
        return [torch.load(out / f"{name}.{world}.{r}.pt", weights_only=False) for r in range(world)]

    load.dir = out
    return load


def one_process(name):
    model = cases.build_case(name, SEED)
    return model, cases.train_case(model, name, SEED, 1, 0, lambda s, n: s / n)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_training_equals_one_process(results, name, world):
    model, history = one_process(name)
    ranks = results(name, world)
    for step, (loss, norm) in enumerate(history):
        # Each rank's loss is its share of the global mean; the clipped norm is the global one.
        assert sum(r["history"][step][0] for r in ranks) == pytest.approx(loss, rel=1e-6)
        for r in ranks:
            assert r["history"][step][1] == pytest.approx(norm, rel=1e-6)
    want = cases.full_state(model)
    for r in ranks:
        for key, grad in r["grads"].items():  # every gradient of the first step
            torch.testing.assert_close(grad, model.first_grads[key], rtol=0, atol=1e-6, msg=key)
        assert r["state"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(r["state"][key], value, rtol=0, atol=1e-6, msg=key)
    if name.startswith("softmax"):
        assert all(torch.isfinite(torch.tensor(r["history"])).all() for r in ranks)  # a rank without tokens too
    if name == "sigmoid":
        assert model.moe.router.expert_bias.abs().sum() > 0  # the bias moved
        for r in ranks:  # from the load of the whole global batch, the same on every rank
            assert torch.equal(r["bias"], model.moe.router.expert_bias)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_alone_adds_the_router_terms_as_one_process(results, world):
    # gnn.MoE under FSDP2 (sum) with aux_loss_group="world": aux and z are shares, so
    # global_mean(...) + AUX * aux + Z * z, summed over ranks, is the one-process gradient.
    model, history = one_process("softmax_aux")
    want = cases.full_state(model)
    for r in results("dp_softmax", world):
        for key, grad in r["grads"].items():
            torch.testing.assert_close(grad, model.first_grads[key], rtol=0, atol=1e-6, msg=key)
        for key, value in want.items():
            torch.testing.assert_close(r["state"][key], value, rtol=0, atol=1e-6, msg=key)


def test_dcp_checkpoint_loads_on_2_and_4_ranks_and_in_one_process(results):
    import torch.distributed.checkpoint as dcp

    saved = results("dcp_save", 2)[0]["state"]
    for world in (2, 4):
        for r in results("dcp_load", world):
            assert all(torch.equal(r["state"][k], v) for k, v in saved.items())
    model = cases.build(SEED + 7)  # a plain single-process model
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(results.dir / "ckpt"))
    model.load_state_dict(state)
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items())


def attached_one_process(bf16=False):
    """The attached Qwen3-MoE trained in one process on both ranks' batches (the mean of their
    mean losses: equal batches); bf16: computing as a bf16 MixedPrecisionPolicy does."""
    sys.path.insert(0, str(HERE.parent / "hf"))
    import grouter.hf
    from hf_models import small_grouter, tiny

    torch.manual_seed(SEED)
    model = grouter.hf.attach(tiny("qwen3_moe"), small_grouter())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(ids):
        if not bf16:
            return model(input_ids=ids, labels=ids).loss
        params = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
        return torch.func.functional_call(model, params, (), dict(input_ids=ids, labels=ids)).loss

    for step in range(2):
        ids = torch.randint(3, 101, (4, 9), generator=torch.Generator().manual_seed(SEED + step))
        opt.zero_grad()
        (sum(loss(ids[2 * r:2 * r + 2]) for r in range(2)) / 2).backward()
        opt.step()
    return model


def test_ddp_with_default_arguments_trains_an_attached_model(results):
    # attach freezes the gates it bypasses: no "parameters that did not receive grad" error, and
    # DDP's result is one process on the whole batch (equal batches per rank: means average right).
    import grouter.hf

    model = attached_one_process()
    gates = [getattr(block, attr).weight for _, block, attr in grouter.nn.moe_blocks(model)]
    assert not any(g.requires_grad for g in gates)
    want = model.state_dict()
    for r in results("ddp_attached", 2):
        for key, value in want.items():
            torch.testing.assert_close(r["state"][key], value, rtol=0, atol=1e-6, msg=key)
    grouter.hf.detach(model)
    assert all(g.requires_grad for g in gates)


@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp2_per_decoder_layer_trains_an_attached_model(results, bf16):
    # fully_shard on each decoder layer, then the root (FSDP2's default mean over equal batches):
    # one process on the whole batch; with a bf16 policy, one process computing in bf16 from fp32
    # weights (measured: bitwise equal; fp32 differs by 2e-4, so the policy is in effect).
    want = attached_one_process(bf16).state_dict()
    for r in results("fsdp_attached_bf16" if bf16 else "fsdp_attached", 2):
        assert r["state"].keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(r["state"][key], value, rtol=0, atol=1e-5 if bf16 else 1e-6, msg=key)


def test_router_loss_terms_with_a_group_are_shares_of_the_global_batch(results):
    # aux_loss_group="world": each rank's aux and z losses are its shares; they sum to what one
    # process computes on the whole global batch (the softmax_* training cases check gradients).
    from grouter.nn import SoftmaxTopKRouter

    torch.manual_seed(SEED)
    router = SoftmaxTopKRouter(cases.H, cases.E, cases.K)
    router(cases.batch(SEED, 0)[0])
    ranks = results("global_aux", 2)
    torch.testing.assert_close(sum(r["aux"] for r in ranks), router.aux_loss.detach())
    torch.testing.assert_close(sum(r["z"] for r in ranks), router.z_loss.detach())


def test_ddp_around_expert_parallel_layers_raises_instead_of_overwriting_experts(results):
    # DDP would broadcast rank 0's parameters; the experts are DTensors, which it refuses.
    for r in results("ddp_around_ep", 2):
        assert r["error"] and "DTensor" in r["error"], r["error"]
