"""Teacher logits: the source router's logits for a token set, computed once and then read.

Distillation trains for many epochs on the same tokens; the source (a large MoE, or its first
layers) runs once over them. On disk a teacher folder is `header.json` plus raw arrays,
memory-mapped: tokens.bin (int32 [count, S]) and logits.bin (bfloat16 bits [count, S, E]). The
header records the data's and the source's fingerprints and how many samples are done, so an
interrupted pass continues where it stopped, and a folder for other data or another source is
refused.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .array_folder import bf16_bits, check_sizes, from_bf16_bits, read_header, write_header

__all__ = ["TeacherLogits", "teacher_logits", "fingerprint_tokens", "run_to_router"]

FORMAT_VERSION = 1
CHECKPOINT_SECONDS = 10.0  # an interrupted pass loses at most this much work


class _Captured(Exception):
    """Stops the source's forward right after the distilled router ran."""


def run_to_router(source: nn.Module, capture, tokens: Tensor) -> Tensor:
    """The router logits [tokens, E] of `capture`'s layer for token ids [B, S]; the source stops
    right after that router (the layers above it, and its experts, never run)."""
    capture.stop = True
    try:
        source(tokens)
    except _Captured:
        pass
    finally:
        capture.stop = False
    if capture.logits is None:
        raise RuntimeError(f"the source's router at the distilled layer did not run for input {tuple(tokens.shape)}")
    return capture.logits


def fingerprint_tokens(samples: Tensor) -> str:
    """sha256 of the samples' int32 bytes and shape."""
    h = hashlib.sha256(str(tuple(samples.shape)).encode())
    h.update(samples.to(torch.int32).contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherLogits:
    """Token samples [count, S] and the source router's logits [count, S, E] (bf16), in memory or mapped."""

    def __init__(self, tokens, logits, header: dict, path: Optional[Path] = None):
        self.tokens, self.logits, self.header, self.path = tokens, logits, header, path

    @property
    def count(self) -> int:
        return self.header["done"]

    @property
    def num_experts(self) -> int:
        return self.header["num_experts"]

    def __len__(self) -> int:
        return self.count

    def batch(self, start: int, size: int) -> Tuple[Tensor, Tensor]:
        """(tokens [b, S] int64, logits [b, S, E] float32) of samples start:start+size."""
        end = min(start + size, self.count)
        tokens = self.token_ids(start, end)
        raw = self.logits[start:end]
        if isinstance(raw, Tensor):
            return tokens, raw.float()
        return tokens, from_bf16_bits(raw).float()

    def token_ids(self, start: int = 0, end: Optional[int] = None) -> Tensor:
        """int64 token ids of samples start:end (default: all that are done)."""
        part = self.tokens[start:self.count if end is None else end]
        return part.long() if isinstance(part, Tensor) else torch.from_numpy(np.array(part)).long()

    def token_range(self) -> Tuple[int, int]:
        """(lowest, highest) token id of the samples done, read in place (no int64 copy)."""
        part = self.tokens[: self.count]
        if isinstance(part, Tensor):
            return int(part.min()), int(part.max())
        return int(np.min(part)), int(np.max(part))

    def batches(self, size: int) -> Iterator[Tuple[Tensor, Tensor]]:
        for start in range(0, self.count, size):
            yield self.batch(start, size)

    @classmethod
    def open(cls, path: Union[str, Path]) -> "TeacherLogits":
        path = Path(path)
        h = read_header(path, "grouter-teacher", FORMAT_VERSION, "teacher-logits")
        count, S, E = h["count"], h["seq_len"], h["num_experts"]
        check_sizes(path, {"tokens.bin": count * S * 4, "logits.bin": count * S * E * 2})
        tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode="r", shape=(count, S))
        logits = np.memmap(path / "logits.bin", dtype="<u2", mode="r", shape=(count, S, E))
        return cls(tokens, logits, h, path)


@torch.no_grad()
def teacher_logits(source: nn.Module, samples: Tensor, layer: int = 0, path: Union[str, Path, None] = None,
                   batch_size: int = 8, source_id: str = "", progress: bool = True) -> TeacherLogits:
    """Run `source` once over samples [count, S] and keep its router logits at MoE layer `layer`.

    path None: in memory. Otherwise a folder, resumed when it holds a pass over the same samples
    (fingerprint) from the same source (`source_id`), refused when it holds another's.
    """
    from .train import RouterLogitCapture

    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ValueError(f"samples must be a non-empty [count, S] tensor of token ids, got {tuple(samples.shape)}")
    samples = samples.cpu()
    count, S = samples.shape
    device = next(source.parameters()).device
    was_training = source.training
    source.eval()
    try:
        with RouterLogitCapture(source, layer) as cap:
            E = run_to_router(source, cap, samples[:1].to(device)).shape[-1]
            header = dict(format="grouter-teacher", format_version=FORMAT_VERSION, count=count, seq_len=S,
                          num_experts=E, layer=layer, data_sha256=fingerprint_tokens(samples), source=source_id, done=0)
            if path is None:
                logits = torch.empty(count, S, E, dtype=torch.bfloat16)
                tokens_store, done = samples.to(torch.int32), 0
            else:
                tokens_store, logits, done = _open_for_writing(Path(path), samples, header)
            starts = range(done, count, batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="teacher logits", unit="batch", leave=False)
            saved = time.monotonic()
            for s in starts:
                out = run_to_router(source, cap, samples[s:s + batch_size].to(device))
                out = out.reshape(-1, S, E).to(torch.bfloat16).cpu()
                if path is None:
                    logits[s:s + len(out)] = out
                else:
                    logits[s:s + len(out)] = bf16_bits(out)
                    if time.monotonic() - saved > CHECKPOINT_SECONDS or s + len(out) == count:
                        logits.flush()  # data first, then the header that counts it
                        header["done"] = s + len(out)
                        write_header(Path(path), header)
                        saved = time.monotonic()
            header["done"] = count
    finally:
        source.train(was_training)
    return TeacherLogits(tokens_store, logits, header, None) if path is None else TeacherLogits.open(path)


def _open_for_writing(path: Path, samples: Tensor, header: dict):
    count, S = samples.shape
    E = header["num_experts"]
    done = 0
    if (path / "header.json").is_file():
        old = read_header(path, "grouter-teacher", FORMAT_VERSION, "teacher-logits")
        same = {k: old.get(k) for k in ("count", "seq_len", "num_experts", "layer", "data_sha256", "source")} == \
               {k: header[k] for k in ("count", "seq_len", "num_experts", "layer", "data_sha256", "source")}
        if not same:
            raise ValueError(f"{path} holds teacher logits of other data or another source; remove it or choose "
                             "another folder")
        done = int(old.get("done", 0))
    path.mkdir(parents=True, exist_ok=True)
    mode = "r+" if done else "w+"
    tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode=mode, shape=(count, S))
    logits = np.memmap(path / "logits.bin", dtype="<u2", mode=mode, shape=(count, S, E))
    if not done:
        tokens[:] = samples.to(torch.int32).numpy()
        tokens.flush()
        write_header(path, header)
    return tokens, logits, done
