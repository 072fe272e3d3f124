"""Pre-dispatch: routes computed once, offline, and stored beside the tokens.

A folder holds `header.json` and raw little-endian arrays, memory-mapped read-only when read:
tokens.bin (int32 [count, S]), ids.bin (uint8 when E <= 256, else int16 [count, S, K]),
weights.bin (bfloat16 bits as uint16 [count, S, K]) and digests.bin (16 bytes per sample: a digest
of its tokens, ids and weights). The header records E, K, S, count, the dtypes and the Grouter's
checksum, and carries its own checksum; the reader refuses an edited or invalid header, files whose
sizes disagree with it, a Grouter other than the one that wrote them, and - when a sample is read -
a sample whose bytes no longer match its digest (one flipped bit is caught).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .array_folder import (DIGEST_BYTES, bf16_bits, check_sizes, from_bf16_bits, positive_int, read_header,
                           sample_digest, verify_digests, write_header)

__all__ = ["predispatch", "PredispatchReader"]

FORMAT_VERSION = 2
_FIELDS = dict(num_experts=positive_int, top_k=positive_int, seq_len=positive_int, count=positive_int,
               ids_dtype=lambda v: v in ("uint8", "int16"), weights_dtype=lambda v: v == "bfloat16",
               grouter_checksum=lambda v: isinstance(v, str))


def _as_samples(tokens, seq_len: Optional[int]) -> Tensor:
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, Tensor) else tokens)
    if t.dtype.is_floating_point:
        raise ValueError("tokens must be integer token ids")
    if t.dim() == 1:
        if not seq_len:
            raise ValueError("a 1-D token array needs seq_len to cut it into samples")
        n = t.numel() // seq_len
        if n == 0:
            raise ValueError(f"{t.numel()} tokens do not fill one sample of {seq_len}")
        t = t[: n * seq_len].view(n, seq_len)
    if t.dim() != 2:
        raise ValueError(f"tokens must be [count, S] or 1-D, got shape {tuple(t.shape)}")
    return t.long()


@torch.no_grad()
def predispatch(g, tokens, path: Union[str, Path], seq_len: Optional[int] = None, batch_size: int = 64,
                progress: bool = True) -> Path:
    """Route `tokens` ([count, S], or 1-D cut into seq_len samples) with g and write them to `path`."""
    samples = _as_samples(tokens, seq_len)
    count, S = samples.shape
    E, K = g.num_experts, g.top_k
    if E > 32767:
        raise ValueError(f"pre-dispatch stores expert ids as int16; {E} experts do not fit")
    id_dtype = np.dtype(np.uint8) if E <= 256 else np.dtype("<i2")  # little-endian, as the header says
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    device = next(g.parameters()).device
    t_mm = np.memmap(path / "tokens.bin", dtype="<i4", mode="w+", shape=(count, S))
    i_mm = np.memmap(path / "ids.bin", dtype=id_dtype, mode="w+", shape=(count, S, K))
    w_mm = np.memmap(path / "weights.bin", dtype="<u2", mode="w+", shape=(count, S, K))
    d_mm = np.memmap(path / "digests.bin", dtype=np.uint8, mode="w+", shape=(count, DIGEST_BYTES))
    starts = range(0, count, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predispatch", leave=False)
    for s in starts:
        batch = samples[s:s + batch_size]
        ids, w = g.route(batch.to(device))
        t_mm[s:s + len(batch)] = batch.numpy().astype("<i4")
        i_mm[s:s + len(batch)] = ids.cpu().numpy().astype(id_dtype)
        w_mm[s:s + len(batch)] = bf16_bits(w)
        for i in range(s, s + len(batch)):
            d_mm[i] = sample_digest(t_mm[i], i_mm[i], w_mm[i])
    for mm in (t_mm, i_mm, w_mm, d_mm):
        mm.flush()
    header = dict(format="grouter-predispatch", format_version=FORMAT_VERSION, num_experts=E, top_k=K,
                  seq_len=S, count=count, ids_dtype=np.dtype(id_dtype).name, weights_dtype="bfloat16",
                  grouter_checksum=g.checksum())
    write_header(path, header)
    return path


class PredispatchReader:
    """Reads a pre-dispatched folder; iterating yields (tokens [S], ids [S, K], weights [S, K])."""

    def __init__(self, path: Union[str, Path], grouter=None):
        path = Path(path)
        h = read_header(path, "grouter-predispatch", FORMAT_VERSION, "pre-dispatch", _FIELDS)
        count, S, K, E = h["count"], h["seq_len"], h["top_k"], h["num_experts"]
        if K > E or h["ids_dtype"] != ("uint8" if E <= 256 else "int16"):
            raise ValueError(f"{path / 'header.json'}: inconsistent fields (top_k {K}, num_experts {E}, ids_dtype "
                             f"{h['ids_dtype']})")
        id_dtype = np.dtype(h["ids_dtype"]).newbyteorder("<")
        check_sizes(path, {"tokens.bin": count * S * 4, "ids.bin": count * S * K * id_dtype.itemsize,
                           "weights.bin": count * S * K * 2, "digests.bin": count * DIGEST_BYTES})
        if grouter is not None:
            if grouter.checksum() != h["grouter_checksum"]:
                raise ValueError(f"{path} was routed by another Grouter (checksum mismatch)")
            if (grouter.num_experts, grouter.top_k) != (h["num_experts"], K):
                raise ValueError(f"{path} holds E={h['num_experts']} K={K} routes, the Grouter has "
                                 f"E={grouter.num_experts} K={grouter.top_k}")
        self.header, self.path = h, path
        self.tokens = np.memmap(path / "tokens.bin", dtype="<i4", mode="r", shape=(count, S))
        self.ids = np.memmap(path / "ids.bin", dtype=id_dtype, mode="r", shape=(count, S, K))
        self.weights = np.memmap(path / "weights.bin", dtype="<u2", mode="r", shape=(count, S, K))
        self.digests = np.memmap(path / "digests.bin", dtype=np.uint8, mode="r", shape=(count, DIGEST_BYTES))

    def __len__(self) -> int:
        return self.header["count"]

    def _arrays(self):
        return [self.tokens, self.ids, self.weights]

    def verify(self) -> None:
        """Check every sample against its digest (reading a sample checks that sample only)."""
        verify_digests(self.path, self.digests, self._arrays(), 0, len(self))

    def __getitem__(self, i) -> Tuple[Tensor, Tensor, Tensor]:
        """Sample i ([S], [S, K], [S, K]) or a slice of samples ([n, S], ...), each checked against its
        digest as it is read; expert ids are range-checked here."""
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("PredispatchReader reads contiguous slices only")
            stop = max(start, stop)
        elif -len(self) <= i < len(self):
            start = i % len(self)
            stop = start + 1
        else:
            raise IndexError(f"sample {i} of {len(self)}")
        verify_digests(self.path, self.digests, self._arrays(), start, stop)
        tokens = torch.from_numpy(np.array(self.tokens[start:stop], dtype=np.int64))
        ids = torch.from_numpy(np.array(self.ids[start:stop], dtype=np.int64))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.header["num_experts"]):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"{self.path / 'ids.bin'}: samples {start}:{stop} hold expert id {bad}, outside "
                             f"[0, {self.header['num_experts']})")
        weights = from_bf16_bits(self.weights[start:stop])
        if not isinstance(i, slice):
            return tokens[0], ids[0], weights[0]
        return tokens, ids, weights

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor]]:
        for i in range(len(self)):
            yield self[i]
