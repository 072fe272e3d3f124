"""The `grouter` command: demo | distill | fold | tune | predispatch | inspect (`grouter CMD --help`).

Token data (--data) is a .npy array of token ids, or any other file read as bytes (vocabulary 256).
Grouters are read and written in the artifact format of `Grouter.save` (a folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch


def load_tokens(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"grouter: no such data file: {p}")
    if p.suffix == ".npy":
        return torch.from_numpy(np.load(p).astype(np.int64).reshape(-1))
    return torch.from_numpy(np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.int64))


def token_batches(tokens: torch.Tensor, seq_len: int, batch_size: int, max_batches: Optional[int]) -> List[torch.Tensor]:
    n = tokens.numel() // seq_len
    if n == 0:
        raise SystemExit(f"grouter: {tokens.numel()} tokens do not fill one sequence of {seq_len}")
    samples = tokens[: n * seq_len].view(n, seq_len)
    batches = list(samples.split(batch_size))
    return batches[:max_batches] if max_batches else batches


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help=".npy token ids, or a file read as bytes")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)


def _batches(args) -> List[torch.Tensor]:
    return token_batches(load_tokens(args.data), args.seq_len, args.batch_size, args.max_batches)


def _load_grouter(path: str):
    from .router import Grouter

    try:
        return Grouter.load(path)
    except ValueError as e:
        raise SystemExit(f"grouter: {e}") from None


def cmd_distill(args) -> None:
    from transformers import AutoModelForCausalLM

    from .hf import moe_blocks
    from .router import Grouter, distill, kl_to_source

    source = AutoModelForCausalLM.from_pretrained(args.source)
    blocks = moe_blocks(source)
    if not blocks:
        raise SystemExit(f"grouter: {args.source} has no MoE blocks")
    E = blocks[0][1].experts.num_experts
    g = Grouter(source.config.vocab_size, E, args.top_k or source.config.num_experts_per_tok, d_model=args.d_model,
                n_layers=args.n_layers, n_heads=args.n_heads, causal=not args.bidirectional,
                source=f"{args.source} (MoE layer {args.layer})")
    batches = _batches(args)
    before = kl_to_source(g, source, batches, args.layer)
    history = distill(g, source, batches, layer=args.layer, steps=args.steps, lr=args.lr)
    after = kl_to_source(g, source, batches, args.layer)
    g.save(args.out)
    print(f"distilled {args.out}: KL to the source router {before:.4g} -> {after:.4g} ({len(history)} steps)")


def cmd_fold(args) -> None:
    from .router import affinity, fold, fold_groups

    g = _load_grouter(args.grouter)
    groups = fold_groups(affinity(g, _batches(args)), args.experts, strategy=args.strategy)
    folded = fold(g, groups, top_k=args.top_k)
    folded.save(args.out)
    print(f"folded {g.num_experts} -> {args.experts} experts into {args.out}; groups {groups.tolist()}")


def cmd_tune(args) -> None:
    from .router import tune

    g = _load_grouter(args.grouter)
    result = tune(g, _batches(args), method=args.method, steps=args.steps)
    g.save(args.out)
    print(f"tuned {args.out}: MaxVio {result['max_vio_before']:.3f} -> {result['max_vio_after']:.3f}")


def cmd_predispatch(args) -> None:
    from .router import predispatch

    g = _load_grouter(args.grouter)
    path = predispatch(g, load_tokens(args.data), args.out, seq_len=args.seq_len, batch_size=args.batch_size)
    print(f"wrote routes to {path}")


def cmd_inspect(args) -> None:
    from .router import PredispatchReader, max_vio, routing_entropy

    path = Path(args.path)
    if (path / "header.json").is_file():
        reader = PredispatchReader(path)
        print(json.dumps(reader.header, indent=2))
        return
    g = _load_grouter(args.path)
    info = dict(config=g.config, checksum=g.checksum(), parameters=sum(p.numel() for p in g.parameters()))
    if args.data:
        batches = _batches(args)
        ids = torch.cat([g.route(b)[0].reshape(-1, g.top_k) for b in batches])
        with torch.no_grad():
            entropy = sum(routing_entropy(g(b)) for b in batches) / len(batches)
        info.update(max_vio=max_vio(ids, g.num_experts), routing_entropy=entropy, tokens=ids.shape[0])
    print(json.dumps(info, indent=2))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, corpus=args.corpus, preset=args.preset, seeds=args.seeds,
             device=args.device, resume=args.resume, jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grouter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the whole method end to end on an embedded corpus, with a report")
    p.add_argument("--quick", action="store_true", help="a small run (about 3 minutes on 2 cores)")
    p.add_argument("--out", default="grouter_demo", help="output folder (default: grouter_demo)")
    p.add_argument("--corpus", default=None, help="a text file or folder instead of the embedded corpus")
    p.add_argument("--preset", default="default", help="default, or fine (64 experts top-8 folded to 32)")
    p.add_argument("--seeds", type=int, default=None, help="seeds for learned_aux and grouter (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="keep finished stages found in --out")
    p.add_argument("--jobs", type=int, default=None, help="target runs at a time (default: 2 on a CPU)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("distill", help="distil a Grouter from a transformers MoE model's router")
    p.add_argument("--source", required=True, help="a local transformers MoE model folder")
    _data_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--layer", type=int, default=0, help="MoE layer whose router is distilled")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=3)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--bidirectional", action="store_true", help="the paper's encoder (routes see future tokens)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("fold", help="fold a Grouter onto fewer experts by co-activation affinity")
    p.add_argument("--grouter", required=True)
    _data_args(p)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--strategy", choices=["affinity", "random", "balance"], default="affinity")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("tune", help="balance a Grouter's load on new data (final projection only)")
    p.add_argument("--grouter", required=True)
    _data_args(p)
    p.add_argument("--method", choices=["aux", "bias"], default="aux")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predispatch", help="route a token file once and store the routes beside it")
    p.add_argument("--grouter", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_predispatch)

    p = sub.add_parser("inspect", help="describe a Grouter folder or a pre-dispatch folder")
    p.add_argument("path")
    p.add_argument("--data", default=None, help="also measure MaxVio and routing entropy on this data")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
