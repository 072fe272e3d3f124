"""Arguments of the `grouter` commands: typed and checked when parsed, so an explicit value is
honoured or refused (never replaced by a default), and data, devices and folders checked before
anything slow (a source checkpoint) is loaded."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_SUFFIXES = (".txt", ".jsonl")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, like every other error of the command
        self.exit(2, f"{self.prog}: {message}\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default (0 included): argparse's, unless the help text already says it."""

    def _get_help_string(self, action):
        default = action.default
        if "default" in (action.help or "") or default is None or default is False or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def formatter(prog):
    return _Help(prog, max_help_position=32)


def _number(kind, test, what):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
natural_int = _number(int, lambda v: v >= 0, "0 or more")
positive_float = _number(float, lambda v: v > 0 and v == v and v != float("inf"), "a positive number")
fraction = _number(float, lambda v: 0 < v < 1, "a fraction in (0, 1)")


def data_args(p: argparse.ArgumentParser, heldout: bool = True, required: bool = True) -> None:
    p.add_argument("--data", required=required, default=None,
                   help="token ids: .npy, .bin (with --dtype), a datasets folder, .txt or .jsonl")
    p.add_argument("--dtype", dest="data_dtype", default=None, choices=["uint8", "uint16", "uint32", "int32"],
                   help="element type of a raw .bin token file")
    p.add_argument("--tokenizer", default=None, help="a local tokenizer folder for .txt/.jsonl data "
                   "(distill: the source's own by default; byte-level Grouters read UTF-8 bytes without one)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    p.add_argument("--doc-separator", default="eos", choices=["eos", "none"],
                   help="between .txt/.jsonl documents: the tokenizer's EOS token, or nothing")
    p.add_argument("--pad-id", type=natural_int, default=None, help="a padding id to drop from both ends of "
                   "datasets rows that have no attention_mask column (rows with one drop masked positions)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sample")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch")
    p.add_argument("--max-samples", type=positive_int, default=None, help="use at most this many samples' worth of "
                   "tokens, from the start of the data (default: all)")
    if heldout:
        p.add_argument("--heldout", type=fraction, default=0.1, help="fraction held out for the reported quality "
                       "figures: whole documents (rows) when the data has enough of them, else whole samples")
        p.add_argument("--seed", type=natural_int, default=0, help="seed of the held-out choice, the "
                       "initialisation and everything random: equal runs give identical results")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_device(name: str) -> str:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: grouter runs on cpu or cuda")
    return name


def check_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is in the way (an output folder is expected)")
    return out


def check_data(args) -> None:
    """The data file exists and its kind fits the other arguments (before anything is loaded)."""
    path = Path(args.data)
    if not path.exists():
        raise ValueError(f"--data {path}: no such file or folder")
    if path.suffix == ".bin" and args.data_dtype is None:
        raise ValueError(f"--data {path}: a raw .bin token file needs --dtype (uint8, uint16, uint32 or int32)")
    if args.tokenizer is not None:
        from ..tokens import load_tokenizer

        load_tokenizer(args.tokenizer)


def is_text(args) -> bool:
    return Path(args.data).suffix in TEXT_SUFFIXES


def documents(args, vocab_size: Optional[int], tokenizer=None):
    from ..tokens import load_documents

    docs = load_documents(args.data, dtype=args.data_dtype, vocab_size=vocab_size,
                          tokenizer=args.tokenizer if args.tokenizer is not None else tokenizer,
                          text_field=args.text_field, separator=args.doc_separator, pad_id=args.pad_id)
    if args.max_samples is not None:
        docs = docs.head(args.max_samples * args.seq_len)
    return docs


def split(args, docs) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(train, held out, unit), the held-out part chosen with --seed."""
    from ..tokens import split_samples

    train, held, unit = split_samples(docs, args.seq_len, args.heldout, args.seed)
    say(f"data: {train.shape[0] + held.shape[0]} samples of {args.seq_len} tokens; {held.shape[0]} held out "
        f"(whole {unit}, {args.heldout:.0%} of them, seed {args.seed})")
    return train, held, unit


def all_samples(args, docs) -> torch.Tensor:
    n = docs.ids.numel() // args.seq_len
    if n == 0:
        raise ValueError(f"{args.data}: {docs.ids.numel()} tokens do not fill one sample of --seq-len {args.seq_len}")
    return docs.ids[: n * args.seq_len].view(n, args.seq_len)


def batches(samples: torch.Tensor, batch_size: int):
    return list(samples.split(batch_size))


def load_grouter(path: str, device: str = "cpu"):
    from ..router import Grouter

    folder = Path(path)
    try:
        return Grouter.load(folder, map_location=device)
    except ValueError as e:
        if (folder / "grouter" / "config.json").is_file():
            raise ValueError(f"{e}; {folder} looks like a model saved with its Grouter: pass --grouter "
                             f"{folder / 'grouter'}") from None
        raise
