"""Teacher targets: what the source router chose for a token set, computed once and then read.

Distillation trains for many epochs on the same tokens; the source (a large MoE, or its first
layers) runs once over them. For every token the teacher keeps the source block's own choice of
experts (the ids it handed its experts) and the teacher distribution of its router kind
(`grouter.router.source_rule`: softmax(l) for softmax routers; normalised corrected scores within
the chosen groups for sigmoid + correction bias + group-limited ones), as scores z with
softmax(z) = that distribution (for softmax routers z is the router's logits).

On disk a teacher folder is `header.json` plus raw arrays, memory-mapped read-only: tokens.bin
(int32 [count, S]), targets.bin (z as bfloat16 bits [count, S, E]), choice.bin
(uint8 or int16 [count, S, K]) and digests.bin (16 bytes per sample). The header records the
data's sha256, the source's (the bytes of every tensor of the loaded part), the layer, the rule and
how many samples are done, so an interrupted pass continues where it stopped and a folder of other
data or another source, or whose files were truncated or edited, is refused before it is used.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .array_folder import (DIGEST_BYTES, bf16_bits, check_sizes, from_bf16_bits, positive_int, read_header,
                           sample_digest, verify_digests, write_header)
from .capture import SourceCapture, check_choice
from .model import state_sha256
from .source_rule import teacher_scores

__all__ = ["TeacherLogits", "teacher_logits", "fingerprint_tokens", "state_sha256"]

FORMAT = "grouter-teacher"
FORMAT_VERSION = 2
CHECKPOINT_SECONDS = 10.0  # an interrupted pass loses at most this much work
_KEY = ("count", "seq_len", "num_experts", "top_k", "layer", "data_sha256", "source_sha256", "rule", "ids_dtype")
_FIELDS = dict(count=positive_int, seq_len=positive_int, num_experts=positive_int, top_k=positive_int,
               ids_dtype=lambda v: v in ("uint8", "int16"), done=lambda v: type(v) is int and v >= 0,
               data_sha256=lambda v: isinstance(v, str), source_sha256=lambda v: isinstance(v, str))


def fingerprint_tokens(samples) -> str:
    """sha256 of the samples' int32 little-endian bytes and shape."""
    array = samples.to(torch.int32).numpy() if isinstance(samples, Tensor) else np.asarray(samples, dtype="<i4")
    h = hashlib.sha256(str(tuple(array.shape)).encode())
    h.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
    return h.hexdigest()


def _ids_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype("<i2")


class TeacherLogits:
    """Token samples [count, S], the source's choice [count, S, K] and teacher scores z [count, S, E]
    (bf16; softmax(z) is the teacher distribution), in memory or memory-mapped."""

    def __init__(self, tokens, targets, choice, header: dict, path: Optional[Path] = None):
        self.tokens, self.targets, self.choice, self.header, self.path = tokens, targets, choice, header, path

    @property
    def count(self) -> int:
        return self.header["done"]

    @property
    def num_experts(self) -> int:
        return self.header["num_experts"]

    @property
    def top_k(self) -> int:
        """Experts the source chose per token."""
        return self.header["top_k"]

    def __len__(self) -> int:
        return self.count

    def batch(self, start: int, size: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(tokens [b, S] int64, teacher log-probabilities [b, S, E] float32, chosen ids [b, S, K] int64)."""
        end = min(start + size, self.count)
        raw = self.targets[start:end]
        z = (raw if isinstance(raw, Tensor) else from_bf16_bits(raw)).float()
        ids = self.choice[start:end]
        ids = ids if isinstance(ids, Tensor) else torch.from_numpy(np.array(ids))
        return self.token_ids(start, end), z.log_softmax(-1), ids.long()

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

    def batches(self, size: int) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        for start in range(0, self.count, size):
            yield self.batch(start, size)

    @classmethod
    def open(cls, path: Union[str, Path], complete: bool = True) -> "TeacherLogits":
        """Open a teacher folder read-only after checking its header, file sizes, that tokens.bin is
        the data the header names, and every finished sample's digest. complete: refuse a folder whose
        pass was interrupted (resume it with `teacher_logits`)."""
        path = Path(path)
        h = read_header(path, FORMAT, FORMAT_VERSION, "teacher", _FIELDS)
        count, S, E, K = h["count"], h["seq_len"], h["num_experts"], h["top_k"]
        if K > E or h["done"] > count or h["ids_dtype"] != _ids_dtype(E).name:
            raise ValueError(f"{path / 'header.json'}: inconsistent fields (top_k {K}, num_experts {E}, done "
                             f"{h['done']} of {count}, ids_dtype {h['ids_dtype']})")
        ids_dtype = _ids_dtype(E)
        check_sizes(path, {"tokens.bin": count * S * 4, "targets.bin": count * S * E * 2,
                           "choice.bin": count * S * K * ids_dtype.itemsize, "digests.bin": count * DIGEST_BYTES})
        if complete and h["done"] != count:
            raise ValueError(f"{path}: the teacher pass stopped after {h['done']} of {count} samples; run it again "
                             "to finish it")
        tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode="r", shape=(count, S))
        if fingerprint_tokens(tokens) != h["data_sha256"]:
            raise ValueError(f"{path / 'tokens.bin'} is not the data its header names (changed after it was written)")
        targets = np.memmap(path / "targets.bin", dtype="<u2", mode="r", shape=(count, S, E))
        choice = np.memmap(path / "choice.bin", dtype=ids_dtype, mode="r", shape=(count, S, K))
        digests = np.memmap(path / "digests.bin", dtype=np.uint8, mode="r", shape=(count, DIGEST_BYTES))
        verify_digests(path, digests, [tokens, targets, choice], 0, h["done"])
        return cls(tokens, targets, choice, h, path)


@torch.no_grad()
def teacher_logits(source: nn.Module, samples: Tensor, layer: int = 0, path: Union[str, Path, None] = None,
                   batch_size: int = 8, progress: bool = True, overwrite: bool = False,
                   source_sha256: Optional[str] = None) -> TeacherLogits:
    """Run `source` once over samples [count, S] and keep, at MoE layer `layer`, the experts its
    block chose and the teacher distribution of its router kind.

    path None: in memory. Otherwise a folder, resumed when it holds a pass over the same samples
    from the same source (by content: `source_sha256`, default the sha256 of the module's state),
    refused when it holds another's unless `overwrite`. Every batch checks that grouter's reading of
    the router reproduces the block's choice (a router kind it does not know raises).
    """
    if not isinstance(samples, Tensor) or samples.dim() != 2 or samples.shape[0] == 0 or samples.shape[1] == 0:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a non-empty [count, S] tensor of token ids, got {shape}")
    if samples.dtype.is_floating_point or samples.dtype == torch.bool:
        raise ValueError(f"samples must be integer token ids, got {samples.dtype}")
    samples = samples.cpu()
    if int(samples.min()) < 0:
        raise ValueError(f"samples hold a negative token id ({int(samples.min())})")
    count, S = samples.shape
    device = next(source.parameters()).device
    was_training = source.training
    source.eval()
    try:
        with SourceCapture(source, layer) as cap:
            logits, ids = cap.run(samples[:1].to(device))
            E, K = logits.shape[-1], ids.shape[-1]
            header = dict(format=FORMAT, format_version=FORMAT_VERSION, count=count, seq_len=S, num_experts=E,
                          top_k=K, layer=layer, rule=cap.rule.describe(), ids_dtype=_ids_dtype(E).name,
                          data_sha256=fingerprint_tokens(samples), done=0,
                          source_sha256=source_sha256 or ("" if path is None else state_sha256(source)))
            if path is None:
                stores = (samples.to(torch.int32), torch.empty(count, S, E, dtype=torch.bfloat16),
                          torch.empty(count, S, K, dtype=torch.int64), None)
                done = 0
            else:
                stores, done = _open_for_writing(Path(path), samples, header, overwrite)
            tokens, targets, choice, digests = stores
            starts = range(done, count, batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="teacher", unit="batch", leave=False)
            saved = time.monotonic()
            for s in starts:
                logits, ids = cap.run(samples[s:s + batch_size].to(device))
                check_choice(logits, ids, cap.rule, type(source).__name__)
                n = min(batch_size, count - s)
                z = teacher_scores(logits, cap.rule).reshape(n, S, E).to(torch.bfloat16).cpu()
                ids = ids.reshape(n, S, K).cpu()
                if path is None:
                    targets[s:s + n], choice[s:s + n] = z, ids
                    continue
                targets[s:s + n] = bf16_bits(z)
                choice[s:s + n] = ids.numpy().astype(choice.dtype)
                for i in range(s, s + n):
                    digests[i] = sample_digest(tokens[i], targets[i], choice[i])
                if time.monotonic() - saved > CHECKPOINT_SECONDS or s + n == count:
                    for mm in (targets, choice, digests):
                        mm.flush()  # data first, then the header that counts it
                    header["done"] = s + n
                    write_header(Path(path), header)
                    saved = time.monotonic()
            header["done"] = count
    finally:
        source.train(was_training)
    if path is None:
        return TeacherLogits(tokens, targets, choice, header, None)
    return TeacherLogits.open(path)


def _is_teacher_folder(path: Path) -> bool:
    try:
        return json.loads((path / "header.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _open_for_writing(path: Path, samples: Tensor, header: dict, overwrite: bool):
    count, S = samples.shape
    E, K = header["num_experts"], header["top_k"]
    ids_dtype = _ids_dtype(E)
    done = 0
    if path.exists() and any(path.iterdir()):
        if not _is_teacher_folder(path):
            raise ValueError(f"{path} is not empty and holds no teacher targets; choose an empty or new folder")
        try:
            old = TeacherLogits.open(path, complete=False)
            same = all(old.header.get(k) == header[k] for k in _KEY)
            problem = None if same else (f"{path} holds teacher targets of other data or another source (their "
                                         "content changed)")
        except ValueError as e:
            old, problem = None, str(e)
        if problem is not None:
            if not overwrite:
                raise ValueError(f"{problem}; use a new output folder or --overwrite "
                                 "(overwrite=True)") from None
            shutil.rmtree(path)
        else:
            done = old.header["done"]
            del old  # its read-only maps; reopened for writing below, after every check passed
    path.mkdir(parents=True, exist_ok=True)
    mode = "r+" if done else "w+"
    tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode=mode, shape=(count, S))
    targets = np.memmap(path / "targets.bin", dtype="<u2", mode=mode, shape=(count, S, E))
    choice = np.memmap(path / "choice.bin", dtype=ids_dtype, mode=mode, shape=(count, S, K))
    digests = np.memmap(path / "digests.bin", dtype=np.uint8, mode=mode, shape=(count, DIGEST_BYTES))
    if not done:
        tokens[:] = samples.to(torch.int32).numpy()
        tokens.flush()
        write_header(path, header)
    return (tokens, targets, choice, digests), done
