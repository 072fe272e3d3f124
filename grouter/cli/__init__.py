"""The `grouter` command: demo | distill | fold | expand | tune | predispatch | export-table | inspect
(`grouter CMD --help`).

Token data (--data): .npy integer arrays, raw .bin files with --dtype, a datasets folder
(save_to_disk, an input_ids column; padding dropped), or .txt/.jsonl text tokenised offline, its
documents separated by the tokenizer's EOS (see grouter.tokens). Each step holds out part of the
data (--heldout: whole documents, chosen with --seed) and reports its quality figures on it, in
<out>/report.json under "heldout". Arguments, data and devices are checked before anything slow is
loaded; every error is one line on stderr and exit status 2 (GROUTER_TRACEBACK=1 shows tracebacks).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from .args import DTYPES, Parser, data_args, formatter, natural_int, positive_float, positive_int
from .commands import (cmd_demo, cmd_distill, cmd_expand, cmd_export_table, cmd_fold, cmd_inspect, cmd_predispatch,
                       cmd_tune, default_grouter_size)

__all__ = ["main", "build_parser", "default_grouter_size"]


def _grouter_step(sub, name: str, help: str, experts: bool = False):
    p = sub.add_parser(name, help=help, description=help, formatter_class=formatter)
    p.add_argument("--grouter", required=True, help="a Grouter folder")
    data_args(p)
    if experts:
        p.add_argument("--experts", type=positive_int, required=True, help="target expert count")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    return p


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="grouter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"grouter {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("demo", help="the whole method end to end on an embedded corpus, with a report",
                       description="the whole method end to end on an embedded corpus, with a report",
                       formatter_class=formatter)
    p.add_argument("--quick", action="store_true", help="a small run (under a minute on 2 cores); same as "
                   "--preset quick")
    p.add_argument("--out", default="grouter_demo", help="output folder")
    p.add_argument("--corpus", default=None, help="a text file or folder instead of the embedded corpus")
    p.add_argument("--preset", default="default", choices=["default", "quick", "fine", "study", "gpu"],
                   help="default (15-19 minutes on 2 cores), quick, fine (64 experts top-8 folded to 32), study (the "
                   "decisive experiment: baselines at 1x/2x/4x with tuned learning rates, a source per seed, a "
                   "domain shift; about an hour on 2 cores, resumable), gpu (a larger model for one GPU, with "
                   "--device cuda)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds of grouter, hash_balanced and learned_aux "
                   "(default: 3; quick 2); the controls keep theirs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--resume", action="store_true", help="keep finished stages found in --out")
    p.add_argument("--jobs", type=positive_int, default=None, help="jobs (trainings) at a time, one thread each "
                   "(default: 2 on a CPU with 2 or more cores, 1 on a GPU)")
    p.set_defaults(func=cmd_demo)

    help = "distil a Grouter from a transformers MoE model's router (its real choice of experts)"
    p = sub.add_parser("distill", help=help, description=help, formatter_class=formatter)
    p.add_argument("--source", required=True, help="a local transformers MoE model folder (only the layers up to "
                   "the distilled one are read)")
    data_args(p)
    p.add_argument("--out", required=True, help="output folder: the Grouter, report.json, teacher/ (the source's "
                   "targets, kept by content: a rerun over the same source and data resumes them)")
    p.add_argument("--overwrite", action="store_true", help="recompute teacher/ when it holds another source's or "
                   "other data's targets (default: refuse)")
    p.add_argument("--layer", type=natural_int, default=0, help="MoE layer whose router is distilled")
    p.add_argument("--top-k", type=positive_int, default=None, help="experts per token (default: the source's)")
    p.add_argument("--d-model", type=positive_int, default=None, help="Grouter width (default: the source's hidden "
                   "size / 4, a multiple of 32 within [64, 512])")
    p.add_argument("--n-layers", type=positive_int, default=None, help="Grouter blocks (default: 3, as the paper)")
    p.add_argument("--n-heads", type=positive_int, default=None, help="attention heads (default: d_model / 64)")
    p.add_argument("--bidirectional", action="store_true", help="the paper's encoder (routes see future tokens)")
    p.add_argument("--steps", type=positive_int, default=300, help="distillation steps")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (AdamW, warm-up, cosine decay)")
    p.add_argument("--device", default="cpu", help="device for the source and the Grouter (cpu, cuda, cuda:1)")
    p.add_argument("--source-dtype", default=None, choices=sorted(DTYPES), help="load the source in this dtype "
                   "(default: as stored)")
    p.set_defaults(func=cmd_distill)

    p = _grouter_step(sub, "fold", "fold a Grouter onto fewer experts by co-activation affinity", experts=True)
    p.add_argument("--strategy", choices=["affinity", "random", "balance"], default="affinity", help="grouping")
    p.add_argument("--top-k", type=positive_int, default=None, help="experts per token after folding (default: "
                   "unchanged; must be given when --experts is below it)")
    p.set_defaults(func=cmd_fold)

    p = _grouter_step(sub, "expand", "grow a Grouter to more experts by splitting its most loaded ones (tune "
                      "it afterwards)", experts=True)
    p.set_defaults(func=cmd_expand)

    p = _grouter_step(sub, "tune", "balance a Grouter's load on new data (final projection only)")
    p.add_argument("--method", choices=["bias", "aux"], default="bias",
                   help="bias: sign updates of the projection's bias; aux: the load-balancing loss on W_s")
    p.add_argument("--steps", type=positive_int, default=200, help="tuning steps")
    p.add_argument("--lr", type=positive_float, default=None, help="step size (default: 0.02 for bias, 1e-2 for aux)")
    p.set_defaults(func=cmd_tune)

    help = "route a token file once and store the routes, with a copy of the tokens, in --out"
    p = sub.add_parser("predispatch", help=help, description=help, formatter_class=formatter)
    p.add_argument("--grouter", required=True, help="a Grouter folder")
    data_args(p, heldout=False)
    p.set_defaults(batch_size=64)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    p.set_defaults(func=cmd_predispatch)

    help = ("a context-free table of a Grouter: each token id's most frequent expert set (and mean weights) over "
            "--data, as a [vocab, K] safetensors file (grouter.TableRouter), with its agreement on held-out data")
    p = sub.add_parser("export-table", help=help, description=help, formatter_class=formatter)
    p.add_argument("grouter", help="a Grouter folder")
    data_args(p)
    p.add_argument("--out", required=True, help="the table file (.safetensors); a report goes beside it (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table file")
    p.add_argument("--device", default="cpu", help="device to run the Grouter on")
    p.set_defaults(func=cmd_export_table)

    help = "describe a Grouter folder, or verify and describe a pre-dispatch folder"
    p = sub.add_parser("inspect", help=help, description=help, formatter_class=formatter)
    p.add_argument("path", help="a Grouter or pre-dispatch folder")
    data_args(p, heldout=False, required=False)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"grouter {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become a line and an exit status
        if os.environ.get("GROUTER_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (ValueError, TypeError, OSError, RuntimeError)):
            message = f"{type(e).__name__}: {message}"
        print(f"grouter {args.command}: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
