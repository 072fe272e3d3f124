"""The `grouter` command: demo | distill | fold | tune | predispatch | inspect (`grouter CMD --help`).

Token data (--data): .npy integer arrays, raw .bin files with --dtype, a datasets folder
(save_to_disk, an input_ids column), or .txt/.jsonl text tokenised offline (see grouter.tokens).
Each step holds out part of the samples (--heldout) and reports its quality figures on them, in
<out>/report.json under "heldout". Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every other error of the command
        self.exit(2, f"{self.prog}: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default: argparse's, unless the help text already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _formatter(prog):
    return _Help(prog, max_help_position=32)


# --- data -----------------------------------------------------------------------------------------

def _data_args(p: argparse.ArgumentParser, heldout: bool = True) -> None:
    p.add_argument("--data", required=True, help="token ids: .npy, .bin (with --dtype), a datasets folder, .txt or .jsonl")
    p.add_argument("--dtype", dest="data_dtype", default=None, choices=["uint8", "uint16", "uint32", "int32"],
                   help="element type of a raw .bin token file")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer folder for .txt/.jsonl data "
                   "(distill: the source's own by default; byte-level Grouters read UTF-8 bytes without one)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many samples (default: all)")
    if heldout:
        p.add_argument("--heldout", type=float, default=0.1,
                       help="fraction of the samples held out for the reported quality figures")


def _samples(args, vocab_size: Optional[int], tokenizer=None) -> torch.Tensor:
    from .tokens import load_tokens

    tokens = load_tokens(args.data, dtype=args.data_dtype, vocab_size=vocab_size,
                         tokenizer=args.tokenizer or tokenizer, text_field=args.text_field)
    if args.seq_len < 1 or args.batch_size < 1:
        raise ValueError("--seq-len and --batch-size must be positive")
    n = tokens.numel() // args.seq_len
    if n == 0:
        raise ValueError(f"{args.data}: {tokens.numel()} tokens do not fill one sample of --seq-len {args.seq_len}")
    samples = tokens[: n * args.seq_len].view(n, args.seq_len)
    return samples[: args.max_samples] if args.max_samples else samples


def _split(args, samples: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): the held-out samples are every k-th one, spread over the whole file."""
    if not 0 < args.heldout < 1:
        raise ValueError(f"--heldout {args.heldout}: a fraction in (0, 1) is expected")
    n = samples.shape[0]
    k = max(1, n - 1) if n * args.heldout < 1 else max(1, round(1 / args.heldout))
    held = torch.zeros(n, dtype=torch.bool)
    held[k - 1::k] = True
    if held.all() or not held.any():
        raise ValueError(f"{args.data}: {n} samples of {args.seq_len} tokens are too few to hold some out")
    _say(f"data: {n} samples of {args.seq_len} tokens; {int(held.sum())} held out ({args.heldout:.0%})")
    return samples[~held], samples[held]


def _batches(samples: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    return list(samples.split(batch_size))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(out: Path, command: str, heldout: dict, **extra) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = dict(command=command, heldout=heldout, **extra)
    (out / "report.json").write_text(json.dumps(report, indent=2))


def _load_grouter(path: str, device: str = "cpu"):
    from .router import Grouter

    return Grouter.load(path, map_location=device)


# --- commands ---------------------------------------------------------------------------------------

def default_grouter_size(hidden_size: Optional[int]) -> Tuple[int, int, int]:
    """(d_model, n_layers, n_heads) that fit a source of this width: d_model = hidden/4 rounded to a
    multiple of 32, within [64, 512] (the paper's 512 for a 2048-wide source), 3 layers, 64-wide heads."""
    d = 512 if not hidden_size else min(512, max(64, round(hidden_size / 4 / 32) * 32))
    return d, 3, max(1, d // 64)


def cmd_distill(args) -> None:
    from .hf.source import load_source
    from .router import Grouter, distill, heldout_metrics, teacher_logits

    device, dtype = args.device, DTYPES[args.source_dtype] if args.source_dtype else None
    t0 = time.perf_counter()
    source, info = load_source(args.source, args.layer, device=device, dtype=dtype)
    _say(f"source: {info['model_type']}, MoE layer {args.layer} in decoder layer {info['decoder_layers_kept'] - 1} "
         f"(read {info['decoder_layers_kept']} of {info['decoder_layers_total']} decoder layers), "
         f"{info['num_experts']} experts, {time.perf_counter() - t0:.1f} s")
    train, held = _split(args, _samples(args, info["vocab_size"], tokenizer=args.source))
    d, n_layers, n_heads = default_grouter_size(info["hidden_size"])
    g = Grouter(info["vocab_size"], info["num_experts"], args.top_k or info["top_k"] or 2,
                d_model=args.d_model or d, n_layers=args.n_layers or n_layers, n_heads=args.n_heads or n_heads,
                causal=not args.bidirectional, source=f"{args.source} (MoE layer {args.layer})").to(device)
    out = Path(args.out)
    source_id = f"{Path(args.source).resolve()}|layer={args.layer}|dtype={args.source_dtype}"
    teacher = teacher_logits(source, train, args.layer, out / "teacher" / "train", args.batch_size, source_id)
    teacher_held = teacher_logits(source, held, args.layer, out / "teacher" / "heldout", args.batch_size, source_id)
    del source
    before = heldout_metrics(g, teacher_held)
    t0 = time.perf_counter()
    history = distill(g, teacher, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    after = heldout_metrics(g, teacher_held)
    g.save(out)
    heldout = dict(samples=int(held.shape[0]), tokens=after["tokens"], kl_before=before["kl"], kl_after=after["kl"],
                   topk_agreement_before=before["topk_agreement"], topk_agreement=after["topk_agreement"])
    _report(out, "distill", heldout, steps=len(history), distill_seconds=seconds, train_samples=int(train.shape[0]),
            grouter=g.config, loss_first=history[0], loss_last=history[-1])
    print(f"distilled {out}: held-out KL to the source router {before['kl']:.4g} -> {after['kl']:.4g}, "
          f"top-{g.top_k} agreement {before['topk_agreement']:.3f} -> {after['topk_agreement']:.3f} "
          f"({len(history)} steps, {seconds:.1f} s)")


def cmd_fold(args) -> None:
    from .router import affinity, fold, fold_groups, max_vio

    g = _load_grouter(args.grouter, args.device)
    train, held = _split(args, _samples(args, g.vocab_size))
    groups = fold_groups(affinity(g, _batches(train, args.batch_size)), args.experts, strategy=args.strategy)
    folded = fold(g, groups, top_k=args.top_k)
    vio = max_vio(torch.cat([folded.route(b.to(args.device))[0].reshape(-1, folded.top_k).cpu()
                             for b in _batches(held, args.batch_size)]), folded.num_experts)
    folded.save(args.out)
    _report(Path(args.out), "fold", dict(samples=int(held.shape[0]), max_vio=vio), groups=groups.tolist(),
            strategy=args.strategy, affinity_samples=int(train.shape[0]))
    print(f"folded {g.num_experts} -> {args.experts} experts into {args.out}; held-out MaxVio {vio:.3f}; "
          f"groups {groups.tolist()}")


def cmd_tune(args) -> None:
    from .router import tune

    g = _load_grouter(args.grouter, args.device)
    train, held = _split(args, _samples(args, g.vocab_size))
    result = tune(g, _batches(train, args.batch_size), method=args.method, steps=args.steps, lr=args.lr,
                  heldout=_batches(held, args.batch_size))
    g.save(args.out)
    heldout = dict(samples=int(held.shape[0]), max_vio_before=result["max_vio_before"],
                   max_vio_after=result["max_vio_after"])
    _report(Path(args.out), "tune", heldout, method=args.method, steps=args.steps, best_step=result["best_step"])
    print(f"tuned {args.out}: held-out MaxVio {result['max_vio_before']:.3f} -> {result['max_vio_after']:.3f} "
          f"(best at step {result['best_step']} of {args.steps})")


def cmd_predispatch(args) -> None:
    from .router import predispatch

    g = _load_grouter(args.grouter, args.device)
    samples = _samples(args, g.vocab_size)
    path = predispatch(g, samples, args.out, batch_size=args.batch_size)
    print(f"wrote routes of {samples.shape[0]} samples to {path}")


def cmd_inspect(args) -> None:
    from .router import PredispatchReader, max_vio, routing_entropy

    path = Path(args.path)
    if (path / "header.json").is_file():
        print(json.dumps(PredispatchReader(path).header, indent=2))
        return
    g = _load_grouter(args.path)
    info = dict(config=g.config, checksum=g.checksum(), parameters=sum(p.numel() for p in g.parameters()))
    if args.data:
        batches = _batches(_samples(args, g.vocab_size), args.batch_size)
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
    from . import __version__

    parser = _Parser(prog="grouter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"grouter {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=_formatter)

    p = command("demo", "the whole method end to end on an embedded corpus, with a report")
    p.add_argument("--quick", action="store_true", help="a small run (under a minute on 2 cores); same as "
                   "--preset quick")
    p.add_argument("--out", default="grouter_demo", help="output folder")
    p.add_argument("--corpus", default=None, help="a text file or folder instead of the embedded corpus")
    p.add_argument("--preset", default="default", choices=["default", "quick", "fine", "gpu"],
                   help="default (about 15 minutes on 2 cores), quick, fine (64 experts top-8 folded to 32), gpu (a "
                   "larger model for one GPU, with --device cuda)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of grouter, hash_balanced and learned_aux (default: "
                   "3; quick 2); the controls keep theirs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--resume", action="store_true", help="keep finished stages found in --out")
    p.add_argument("--jobs", type=int, default=None, help="jobs (trainings) at a time, one thread each (default: 2 "
                   "on a CPU with 2 or more cores, 1 on a GPU)")
    p.set_defaults(func=cmd_demo)

    p = command("distill", "distil a Grouter from a transformers MoE model's router")
    p.add_argument("--source", required=True, help="a local transformers MoE model folder (only the layers up to "
                   "the distilled one are read)")
    _data_args(p)
    p.add_argument("--out", required=True, help="output folder: the Grouter, report.json, teacher/ (cached source "
                   "logits: a rerun resumes them)")
    p.add_argument("--layer", type=int, default=0, help="MoE layer whose router is distilled")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the source's)")
    p.add_argument("--d-model", type=int, default=None, help="Grouter width (default: the source's hidden size / 4, "
                   "a multiple of 32 within [64, 512])")
    p.add_argument("--n-layers", type=int, default=None, help="Grouter blocks (default: 3, as the paper)")
    p.add_argument("--n-heads", type=int, default=None, help="attention heads (default: d_model / 64)")
    p.add_argument("--bidirectional", action="store_true", help="the paper's encoder (routes see future tokens)")
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up, cosine decay)")
    p.add_argument("--device", default="cpu", help="device for the source and the Grouter (cpu, cuda, cuda:1)")
    p.add_argument("--source-dtype", default=None, choices=sorted(DTYPES), help="load the source in this dtype "
                   "(default: as stored)")
    p.set_defaults(func=cmd_distill)

    p = command("fold", "fold a Grouter onto fewer experts by co-activation affinity")
    p.add_argument("--grouter", required=True, help="a Grouter folder")
    _data_args(p)
    p.add_argument("--experts", type=int, required=True, help="target expert count")
    p.add_argument("--strategy", choices=["affinity", "random", "balance"], default="affinity", help="grouping")
    p.add_argument("--top-k", type=int, default=None, help="experts per token after folding (default: unchanged)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    p.set_defaults(func=cmd_fold)

    p = command("tune", "balance a Grouter's load on new data (final projection only)")
    p.add_argument("--grouter", required=True, help="a Grouter folder")
    _data_args(p)
    p.add_argument("--method", choices=["bias", "aux"], default="bias",
                   help="bias: sign updates of the projection's bias; aux: the load-balancing loss on W_s")
    p.add_argument("--steps", type=int, default=200, help="tuning steps")
    p.add_argument("--lr", type=float, default=None, help="step size (default: 0.02 for bias, 1e-2 for aux)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    p.set_defaults(func=cmd_tune)

    p = command("predispatch", "route a token file once and store the routes beside it")
    p.add_argument("--grouter", required=True, help="a Grouter folder")
    _data_args(p, heldout=False)
    p.set_defaults(batch_size=64)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    p.set_defaults(func=cmd_predispatch)

    p = command("inspect", "describe a Grouter folder or a pre-dispatch folder")
    p.add_argument("path", help="a Grouter or pre-dispatch folder")
    p.add_argument("--data", default=None, help="also measure MaxVio and routing entropy on this data")
    p.add_argument("--dtype", dest="data_dtype", default=None, choices=["uint8", "uint16", "uint32", "int32"],
                   help="element type of a raw .bin token file")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer folder for .txt/.jsonl data")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--max-samples", type=int, default=None, help="use at most this many samples")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("GROUTER_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"grouter {args.command}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
