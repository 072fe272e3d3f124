"""ExpertParallelMoE in a one-process group: the single-process result, and errors for bad input."""

import os

import pytest
import torch
import torch.distributed as dist

import reference as ref
from grouter import nn as gnn
from grouter.parallel import ExpertParallelMoE, ParallelRouting, comm_stats, reset_comm_stats
from launch import free_port


@pytest.fixture(scope="module")
def group():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one local rank: the loopback is enough
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield None
    dist.destroy_process_group()


def routing(T, K, E):
    return ref.random_routing(T, K, E), torch.rand(T, K)


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (50, 2, 8), (33, 8, 8)])
def test_one_rank_equals_moe(group, T, K, E):
    moe = gnn.MoE(16, 8, E, K)
    state = torch.get_rng_state()
    ep = ExpertParallelMoE(moe)
    assert torch.equal(torch.get_rng_state(), state), "wrapping must not draw from the global RNG"
    assert ep.experts.down_proj.to_local().data_ptr() != moe.experts.down_proj.data_ptr()
    assert ep.local_experts == list(range(E))
    assert dict(ep.named_parameters()).keys() == dict(moe.named_parameters()).keys()
    x = torch.randn(T, 16)
    ids, w = routing(T, K, E)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    a, b = moe(xs[0], routing=(ids, w)), ep(xs[1], routing=(ids, w))
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(moe.experts.down_proj.grad, ep.experts.down_proj.grad.to_local())


def test_one_rank_sends_nothing_and_prepares_once(group):
    moe = gnn.MoE(16, 8, 4, 2)
    ep = ExpertParallelMoE(moe)
    ids, w = routing(10, 2, 4)
    reset_comm_stats()
    r = ep.prepare(ids, w, global_expert_ids=[ids])
    ep(torch.randn(2, 5, 16), routing=r)
    s = comm_stats()
    assert (s.count_exchanges, s.bytes_sent) == (0, 0)
    assert not r.exchanged_counts and r.send_splits == r.recv_splits == [20]


@pytest.mark.parametrize("tamper", ["offsets", "ids", "row_of", "send_splits", "local_offsets"])
def test_a_parallel_routing_changed_in_place_is_refused(group, tamper):
    # A plan edited after prepare would send rows to other experts or ranks: refused at use.
    ep = ExpertParallelMoE(gnn.MoE(16, 8, 4, 2))
    x = torch.randn(40, 16)
    r = ep.prepare(*routing(40, 2, 4))
    ep(x, routing=r)  # unchanged: fine, as often as wanted
    edit = {"offsets": lambda: r.plan.expert_offsets.__setitem__(1, r.plan.expert_offsets[1] + 1),
            "ids": lambda: r.expert_ids.__setitem__((0, 0), (r.expert_ids[0, 0] + 1) % 4),
            "row_of": lambda: r.plan.row_of.copy_(r.plan.row_of.flip(0)),
            "send_splits": lambda: r.send_splits.__setitem__(0, r.send_splits[0] - 1),
            "local_offsets": lambda: r.local_offsets.__setitem__(1, r.local_offsets[1] + 1)}
    edit[tamper]()
    with pytest.raises(ValueError, match="changed in place"):
        ep(x, routing=r)
    if tamper in ("offsets", "ids", "row_of"):  # inference tensors: no version counters, checked by content
        with torch.inference_mode():
            r = ep.prepare(torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]]).repeat(10, 1), torch.rand(40, 2))
            ep(x, routing=r)
            edit[tamper]()
            with pytest.raises(ValueError, match="changed in place"):
                ep(x, routing=r)


def test_bad_input(group):
    moe = gnn.MoE(16, 8, 4, 2)
    ep = ExpertParallelMoE(moe)
    x = torch.randn(6, 16)
    ids, w = routing(6, 2, 4)
    with pytest.raises(IndexError, match="outside"):
        ep(x, routing=(ids + 4, w))
    with pytest.raises(ValueError, match="token 0 repeats an expert"):
        ep(x, routing=(torch.zeros(6, 2, dtype=torch.long), w))
    with pytest.raises(ValueError, match="tokens"):
        ep(x[:5], routing=(ids, w))
    with pytest.raises(ValueError, match="same shape"):
        ep(x, routing=(ids, w[:, :1]))
    with pytest.raises(ValueError, match="hidden size"):
        ep(torch.randn(6, 8), routing=(ids, w))
    with pytest.raises(ValueError, match="int32 or int64"):
        ep(x, routing=(ids.float(), w))
    with pytest.raises(TypeError, match="routing must be"):
        ep(x, routing=ids)
    with pytest.raises(ValueError, match="no router"):
        ep(x)
    with pytest.raises(ValueError, match="one tensor per rank"):
        ep.prepare(ids, w, global_expert_ids=[ids, ids])
    with pytest.raises(ValueError, match="this rank's routes"):
        ep.prepare(ids, w, global_expert_ids=[ids[:3]])
    other = ParallelRouting.prepare(ids, w, torch.tensor([[3, 2, 1, 0]]))
    with pytest.raises(ValueError, match="another placement"):
        ep(x, routing=other)
    with pytest.raises(ValueError, match="exactly once"):
        ExpertParallelMoE(moe, placement=[[0, 0, 1, 2]])


def test_needs_an_initialised_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(gnn.MoE(8, 4, 2, 1))


def test_global_routes_must_match_this_ranks_routes(group):
    ep = ExpertParallelMoE(gnn.MoE(16, 8, 4, 2))
    ids, w = routing(6, 2, 4)
    with pytest.raises(ValueError, match="this rank's routes"):
        ep.prepare(ids, w, global_expert_ids=[ids.flip(1)])


def test_all_to_all_checks_its_splits(group):
    from grouter.parallel import all_to_all

    x = torch.randn(5, 3, requires_grad=True)
    y = all_to_all(x, [5], [5])
    y.sum().backward()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="send and receive sizes"):
        all_to_all(x, [4], [4])
    with pytest.raises(ValueError, match="send and receive sizes"):
        all_to_all(x, [5, 0], [5, 0])


def test_comm_counters_are_thread_safe():
    import threading

    from grouter.parallel.dispatch import _counters

    reset_comm_stats()
    threads = [threading.Thread(target=lambda: [_counters.add(all_to_alls=1, bytes_sent=3) for _ in range(5000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = comm_stats()
    assert s.all_to_alls == 20000 and s.bytes_sent == 60000
    reset_comm_stats()


def test_experts_are_dtensor_shards_and_state_dict_is_the_moes(group):
    from torch.distributed.tensor import DTensor

    moe = gnn.MoE(16, 8, 4, 2)
    ep = ExpertParallelMoE(moe)
    assert all(isinstance(p, DTensor) for p in ep.experts.parameters())
    state = ep.state_dict()
    for key, value in moe.state_dict().items():
        assert torch.equal(state[key].full_tensor(), value)
    # A single-process MoE's plain state_dict loads into the expert-parallel layer (as shards).
    other = gnn.MoE(16, 8, 4, 2)
    ep.load_state_dict(other.state_dict())
    assert torch.equal(ep.experts.gate_up_proj.full_tensor(), other.experts.gate_up_proj)
    total = torch.nn.utils.clip_grad_norm_(ep.parameters(), 1.0)  # no gradients yet: a norm of 0
    assert float(total.full_tensor() if isinstance(total, DTensor) else total) == 0.0


def test_state_dict_of_a_non_contiguous_placement_raises(group):
    moe = gnn.MoE(16, 8, 4, 2)
    ep = ExpertParallelMoE(moe, placement=[[2, 0, 3, 1]])
    with pytest.raises(ValueError, match="non-contiguous placement"):
        ep.state_dict()
    with pytest.raises(ValueError, match="non-contiguous placement"):
        ep.load_state_dict(ExpertParallelMoE(moe).state_dict())
    ep.load_state_dict(moe.state_dict())  # plain full tensors: each rank takes its experts by id
    assert torch.equal(ep.experts.down_proj.to_local(), moe.experts.down_proj[[2, 0, 3, 1]])


def test_mesh_and_group_are_exclusive_and_the_mesh_is_checked(group):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    with pytest.raises(ValueError, match="not both"):
        ExpertParallelMoE(gnn.MoE(16, 8, 4, 2), group=dist.group.WORLD, mesh=mesh)
    flat = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    with pytest.raises(ValueError, match="'dp', 'ep'"):
        ExpertParallelMoE(gnn.MoE(16, 8, 4, 2), mesh=flat)


def test_the_experts_numbering_is_saved_and_another_is_refused(group):
    from grouter import Grouter
    from grouter.parallel import relabel_experts, renumber_experts

    g = Grouter(50, 4, 2, d_model=16, n_layers=1, n_heads=2)
    assert torch.equal(g.expert_order, torch.arange(4))
    relabelled, placement = relabel_experts(g, [[2, 0, 3, 1]])
    assert relabelled.expert_order.tolist() == [2, 0, 3, 1]
    twice, _ = relabel_experts(relabelled, [[1, 0, 2, 3]])  # numberings compose
    assert twice.expert_order.tolist() == [0, 2, 3, 1]
    ids = torch.randint(0, 50, (3, 7))
    # renumber_experts reaches any numbering from any other: the same routes, named by the order.
    back = renumber_experts(twice, relabelled.expert_order)
    assert torch.equal(back.expert_order, relabelled.expert_order)
    assert torch.equal(back.route(ids)[0], relabelled.route(ids)[0])
    assert torch.equal(renumber_experts(relabelled, torch.arange(4)).route(ids)[0], g.route(ids)[0])
    moe = gnn.MoE(16, 8, 4, 2)
    saving = ExpertParallelMoE(moe, placement=placement, expert_order=relabelled.expert_order)
    state = saving.state_dict()
    assert state["expert_order"].tolist() == [2, 0, 3, 1]
    ExpertParallelMoE(moe, expert_order=[2, 0, 3, 1]).load_state_dict(state)  # the same numbering
    with pytest.raises(ValueError, match=r"numbered \[2, 0, 3, 1\] \(expert_order\), this layer's \[0, 1, 2, 3\]"):
        ExpertParallelMoE(moe).load_state_dict(state)
    ExpertParallelMoE(moe, expert_order=[3, 2, 1, 0]).load_state_dict(moe.state_dict())  # plain: no record
    with pytest.raises(ValueError, match="permutation of 0..3"):
        ExpertParallelMoE(moe, expert_order=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="permutation of 0..3"):
        renumber_experts(g, [0, 1, 2])


def test_a_relabelled_grouter_saves_its_numbering_and_folding_starts_a_new_one(tmp_path):
    from grouter import Grouter, fold
    from grouter.parallel import relabel_experts

    g, _ = relabel_experts(Grouter(50, 4, 2, d_model=16, n_layers=1, n_heads=2), [[3, 1], [0, 2]])
    g.save(tmp_path / "g")
    assert Grouter.load(tmp_path / "g").expert_order.tolist() == [3, 1, 0, 2]
    folded = fold(g, torch.tensor([0, 0, 1, 1]))
    assert folded.expert_order.tolist() == [0, 1] and "expert_order" not in folded.config
