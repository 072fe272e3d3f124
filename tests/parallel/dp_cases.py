"""Expert parallelism x data parallelism cases, built the same way by the pytest process (one
process, the whole batch: the reference) and by every rank of dp_worker.py.

A small residual network (dense in-projection, one MoE layer, dense head) trained on a global
batch split unevenly over the ranks, with the loss convention of grouter.parallel.global_mean:
each rank's loss is its tokens' summed squared error divided by the global token count, plus the
softmax router's aux and z losses added as one process adds them (the layer makes them shares).
"""

from __future__ import annotations

import torch
from torch import nn

from grouter import nn as gnn
from grouter.nn import update_router_biases

H, I, E, K = 16, 12, 8, 2
COUNTS = {1: [73], 2: [42, 31], 4: [37, 5, 20, 11]}  # tokens per rank
EMPTY = {1: [73], 2: [73, 0], 4: [37, 0, 25, 11]}  # a rank without tokens
STEPS = 3
AUX, Z = 0.1, 0.01  # loss coefficients of the softmax router's terms


class Net(nn.Module):
    def __init__(self, router=None):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = gnn.MoE(H, I, E, K, router=router)
        self.head = nn.Linear(H, H)

    def forward(self, x, routing=None):
        h = torch.tanh(self.inp(x))
        return self.head(h + self.moe(h, routing=routing))


def build(seed: int, router=None) -> Net:
    torch.manual_seed(seed)
    return Net(router)


# Training cases: (router, optimizer, clip). The sigmoid router's bias moves by 0.05 per step.
TRAINING = {"sgd": (None, "sgd", None), "adamw_clip": (None, "adamw", 0.5), "sigmoid": ("sigmoid", "sgd", None),
            "softmax_aux": ("softmax", "sgd", None), "softmax_empty": ("softmax", "adamw", 0.5)}


def counts_of(name: str) -> dict:
    return EMPTY if name.endswith("_empty") else COUNTS


def build_case(name: str, seed: int) -> Net:
    model = build(seed, router=TRAINING[name][0])
    if TRAINING[name][0] == "sigmoid":
        model.moe.router.bias_update_rate = 0.05
    return model


def train_case(model, name: str, seed: int, world: int, rank: int, loss_of):
    _, optimizer, clip = TRAINING[name]
    return train(model, optimizer, seed, world, rank, loss_of, clip, counts_of(name))


def batch(seed: int, step: int):
    """The global batch of a step: (x, target, expert_ids, weights), the same on every rank."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    T = sum(COUNTS[4])
    x, y = torch.randn(T, H, generator=g), torch.randn(T, H, generator=g)
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K]
    w = torch.rand(T, K, generator=g)
    return x, y, ids, w / w.sum(1, keepdim=True)


def rank_slice(world: int, rank: int, counts: dict = COUNTS) -> slice:
    counts = counts[world]
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def train(model, optimizer: str, seed: int, world: int, rank: int, loss_of, clip=None, counts=COUNTS, forward=None,
          after_backward=None):
    """STEPS steps on this rank's share of each global batch (sigmoid routers' biases updated after
    each); returns per step (loss, grad norm), and the first step's gradients (full tensors) as
    `model.first_grads`. forward(x, routing): the model's, by default; after_backward(model): a
    gradient sync of the caller's."""
    opt = make_optimizer(optimizer, model.parameters())
    history = []
    for step in range(STEPS):
        x, y, ids, w = (t[rank_slice(world, rank, counts)] for t in batch(seed, step))
        routing = None if model.moe.router is not None else (ids, w)
        out = model(x, routing=routing) if forward is None else forward(x, routing)
        loss = loss_of(((out.float() - y) ** 2).sum(), x.shape[0])
        if model.moe.aux_loss is not None:  # as one process adds them: the layer makes them shares
            loss = loss + AUX * model.moe.aux_loss + Z * model.moe.z_loss
        opt.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        if step == 0:
            model.first_grads = {n: full(p.grad) for n, p in model.named_parameters()}
        if after_backward is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else float("inf"))
        else:  # plain and DTensor gradients mixed: no norm of them all
            norm = torch.tensor(float("nan"))
        opt.step()
        update_router_biases(model)
        history.append((float(full(loss)), float(full(norm))))
    return history


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_state(model) -> dict:
    """name -> full tensor (DTensors gathered), in single-process names (without the expert-parallel
    layers' record of their experts' numbering)."""
    return {name: full(t) for name, t in model.state_dict().items() if not name.endswith("expert_order")}


def bf16_forward(model):
    """One process computing as FSDP2's bf16 MixedPrecisionPolicy does: bf16 copies of the fp32
    parameters (gradients flow back to them through the casts), bf16 inputs."""
    from torch.func import functional_call

    def forward(x, routing):
        params = {n: p.to(torch.bfloat16) for n, p in model.named_parameters()}
        return functional_call(model, params, (x.to(torch.bfloat16),), dict(routing=routing))
    return forward
