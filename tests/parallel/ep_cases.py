"""Expert-parallel test cases, built the same way by the pytest process and by every rank.

Each case is a global batch split unevenly over the ranks (rank r holds `counts[r]` tokens, some
ranks none), one or two MoE layers, and a routing mode:

  exchange  forward(x, routing=(ids, w)): one count exchange per call
  global    ParallelRouting.prepare(..., global_expert_ids=every rank's ids): no exchange
  shared    one ParallelRouting (one exchange) for both layers of a two-layer stack
  router    the MoE's own (replicated) softmax router: routing=None
  mismatch  like global, but the last rank drops a token from rank 0's routes: every rank must
            raise ValueError (gloo itself would exchange garbage without an error)
  placement_mismatch  the last rank wraps its MoE with another placement: every rank must raise

The "predispatch" case takes its routes from pre-dispatch files of a small Grouter, places the
samples with assign_samples, and plans with the routes of every rank read from the files.
"""

from __future__ import annotations

import tempfile
import warnings

import torch

import reference as ref
from grouter import Grouter, PredispatchReader, predispatch
from grouter import nn as gnn
from grouter.parallel import assign_samples

CASES = {
    "basic": dict(E=8, K=2, counts={2: [37, 5], 4: [37, 0, 13, 64]}, mode="exchange"),
    "global_placement": dict(E=8, K=2, counts={2: [20, 41], 4: [3, 50, 0, 22]}, mode="global", placement="random"),
    "shared_two_layers": dict(E=8, K=3, counts={2: [30, 18], 4: [9, 30, 18, 1]}, mode="shared", layers=2),
    "one_expert_per_rank_k_eq_e": dict(E="W", K="W", counts={2: [12, 25], 4: [12, 25, 0, 7]}, mode="global"),
    "k1_many_experts": dict(E=64, K=1, counts={2: [100, 60], 4: [100, 60, 1, 33]}, mode="exchange",
                            placement="random"),
    "all_to_expert_0": dict(E=8, K=1, counts={2: [10, 6], 4: [10, 6, 0, 4]}, mode="global", route="expert0"),
    "router_gelu": dict(E=8, K=2, counts={2: [26, 40], 4: [26, 40, 11, 0]}, mode="router", activation="gelu"),
    "predispatch": dict(E=8, K=2, samples={2: 7, 4: 10}, seq=6, mode="global", placement="random",
                        route="predispatch"),
    "mismatch": dict(E=8, K=2, counts={2: [9, 7], 4: [9, 7, 3, 5]}, mode="mismatch"),
    "placement_mismatch": dict(E=8, K=2, counts={2: [4, 4], 4: [4, 4, 4, 4]}, mode="placement_mismatch"),
    "bf16": dict(E=8, K=2, counts={2: [33, 16], 4: [33, 16, 8, 2]}, mode="exchange", dtype="bfloat16"),
}
H, I = 32, 16


def resolve(name: str, world: int) -> dict:
    c = dict(CASES[name])
    c["E"] = world if c["E"] == "W" else c["E"]
    c["K"] = world if c["K"] == "W" else c["K"]
    if "counts" in c:
        c["counts"] = c["counts"][world]
    c.setdefault("layers", 1)
    c.setdefault("activation", "silu")
    c["dtype"] = getattr(torch, c.get("dtype", "float32"))
    return c


def build(name: str, world: int, seed: int):
    """(case, list of MoE layers, x, ids, w, grad_out, placement): the whole global batch."""
    c = resolve(name, world)
    E, K, dtype = c["E"], c["K"], c["dtype"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    router = "softmax" if c["mode"] == "router" else None
    layers = [gnn.MoE(H, I, E, K, router=router, activation=c["activation"]).to(dtype) for _ in range(c["layers"])]
    placement = torch.arange(E).view(world, -1)
    if c.get("placement") == "random":
        placement = torch.randperm(E, generator=g).view(world, -1)
    if c.get("route") == "predispatch":
        ids, w, c["counts"] = predispatched(c, world, placement, g)
        w = w.to(dtype)
    T = sum(c["counts"])
    x = torch.randn(T, H, generator=g).to(dtype)
    if c.get("route") != "predispatch":
        ids = ref.random_routing(T, K, E, generator=g)
        if c.get("route") == "expert0":
            ids.zero_()
        w = torch.rand(T, K, generator=g).to(dtype)
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    return c, layers, x, ids, w, grad_out, placement


def predispatched(c, world, placement, g):
    """Routes of a small Grouter written to and read back from pre-dispatch files, with the samples
    assigned to ranks and laid out rank after rank: (ids [T, K], weights [T, K], tokens per rank)."""
    N, S = c["samples"][world], c["seq"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = Grouter(32, c["E"], c["K"], d_model=16, n_layers=1, n_heads=2)
    tokens = torch.randint(0, 32, (N, S), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        predispatch(router, tokens, tmp, progress=False)
        samples = list(PredispatchReader(tmp, grouter=router))
    ids = torch.stack([s[1] for s in samples])
    w = torch.stack([s[2] for s in samples]).float()
    ranks = assign_samples(ids, placement)
    order = torch.sort(ranks, stable=True).indices
    counts = (torch.bincount(ranks, minlength=world) * S).tolist()
    return ids[order].reshape(-1, c["K"]), w[order].reshape(-1, c["K"]), counts


def run(layers, x, routing_for_layer):
    """Apply the layers (the first one plain, later ones residual) to x and return the output."""
    h = x
    for i, layer in enumerate(layers):
        out = layer(h, routing=routing_for_layer(i))
        h = out if i == 0 else h + out
    return h
