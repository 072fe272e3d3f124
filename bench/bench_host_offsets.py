"""expert_mlp with host-side offsets (expert parallelism's case): the registered op, which it now
calls, against the per-expert autograd loop it called before, forward, same inputs, one run.

    python bench/bench_host_offsets.py
"""

import time

import torch

from grouter.ops import experts, expert_mlp


def ms(f, n=30):
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


if __name__ == "__main__":
    torch.manual_seed(0)
    N, H, I, E = 4096, 256, 512, 8
    rows, gate_up, down = torch.randn(N, H), torch.randn(E, 2 * I, H) / 16, torch.randn(E, H, I) / 22
    offsets = [N // E * e for e in range(E + 1)]
    op = ms(lambda: expert_mlp(rows, offsets, gate_up, down, "silu"))
    loop = ms(lambda: experts._ExpertMLP.apply(rows, gate_up, down, experts._slices(offsets, N, E), "silu"))
    print(f"N={N} H={H} I={I} E={E}, {torch.get_num_threads()} threads: op {op:.1f} ms, per-expert loop {loop:.1f} ms, "
          f"loop / op {loop / op:.2f}")
