"""Run as a script: one thread rewrites index tensors in place while the ops read them.

Validated values must be the values used: the ops may return anything for such input (it is a
data race) but must never touch memory out of bounds. test_races.py runs this in a child process,
so a crash fails the test instead of killing pytest. Prints "ok" at the end.
"""

import threading

import torch

from grouter import ops

T, K, E, H = 4096, 2, 16, 64
ids = torch.rand(T, E).argsort(1)[:, :K].contiguous()
plan = ops.routing_plan(ids, E)
row_of = plan.row_of.clone()
x, y, w = torch.randn(T, H), torch.randn(T * K, H), torch.rand(T, K)
stop = threading.Event()


def vandal():
    # Values far outside every valid range, written and undone over and over.
    while not stop.is_set():
        row_of.view(-1)[::7].add_(1 << 30)
        ids.view(-1)[::5].add_(1 << 40)
        row_of.view(-1)[::7].sub_(1 << 30)
        ids.view(-1)[::5].sub_(1 << 40)


thread = threading.Thread(target=vandal)
thread.start()
racy = ops.RoutingPlan(plan.sorted_tokens, row_of, plan.expert_offsets)
try:
    for _ in range(300):
        for call in (lambda: ops.permute(x, racy), lambda: ops.unpermute(y, racy, w),
                     lambda: torch.ops.grouter.unpermute_backward(x, row_of, w, y),
                     lambda: ops.routing_plan(ids, E), lambda: ops.coactivation(ids, E)):
            try:
                call()
            except (ValueError, IndexError):
                pass  # the check saw a value the vandal wrote: the right outcome too
finally:
    stop.set()
    thread.join()
print("ok")
