"""Start W local processes of a script with the environment torchrun gives (gloo rendezvous).

GLOO_SOCKET_IFNAME defaults to the loopback: all ranks are on this machine, and a container's
hostname may not resolve to an address the ranks can reach.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import List, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, argv: Sequence[str], timeout: float = 240) -> List[str]:
    """Run `python *argv` as ranks 0..world-1; return their outputs; raise if any fails or hangs."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    procs = [subprocess.Popen([sys.executable, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = "\n".join(f"--- rank {r}\n{(p.communicate()[0] or '')[-3000:]}" for r, p in enumerate(procs))
        raise AssertionError(f"ranks did not finish within {timeout:.0f} s (a hang?)\n{tails}") from None
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} (exit {procs[r].returncode})\n{outputs[r][-3000:]}" for r in failed)
        raise AssertionError(f"ranks {failed} failed\n{tails}")
    return outputs
