"""The demo's data: text every Python install has, read as bytes (vocabulary 256).

Default corpus: `pydoc_data.topics` and the standard library's `.py` sources (site-packages left
out), in sorted path order. `--corpus PATH` takes any file or folder instead. The byte stream is
cut into blocks; every `val_every`-th block is held out for validation, so both splits span the
whole corpus. Of the token stream left for training, one chunk in `DEV_EVERY` (its place in each
run of chunks drawn with a fixed seed) is carved out as the dev split: what the demo selects on
(tuning's best state, learning rates) reads dev, validation is read only to report, and no
training window overlaps either. Training windows are drawn at random (a seeded generator: the
same data order for every run of a seed); dev and validation windows are spread evenly.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

VOCAB = 256
BLOCK = 4096
DEV_CHUNK = 2048  # tokens
DEV_EVERY = 40  # one chunk in 40 of the training stream is dev (2.5%)
DEV_SEED = 17


def carve_dev(stream: torch.Tensor, every: int = DEV_EVERY, chunk: int = DEV_CHUNK,
              seed: int = DEV_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, dev): one `chunk`-token chunk of every `every` leaves the stream for dev, at a seeded
    place in its run of chunks, so dev spans the whole training stream and no window crosses from
    one into the other (the train stream is joined at the removed chunks, as the splits are at the
    held-out blocks)."""
    n = stream.numel() // chunk
    if n < 2:
        raise ValueError(f"a training stream of {stream.numel()} tokens is too short to carve a dev split of "
                         f"{chunk}-token chunks from")
    runs = max(1, n // every)
    width = n // runs
    g = torch.Generator().manual_seed(seed)
    picked = torch.arange(runs) * width + torch.randint(0, width, (runs,), generator=g)
    is_dev = torch.zeros(n, dtype=torch.bool)
    is_dev[picked] = True
    chunks = stream[: n * chunk].view(n, chunk)
    return torch.cat([chunks[~is_dev].reshape(-1), stream[n * chunk:]]), chunks[is_dev].reshape(-1)


def _stdlib_files() -> List[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def load_corpus(path: Optional[str] = None) -> Tuple[bytes, str]:
    """(the corpus bytes, a description)."""
    if path is None:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        parts = [topics[k].encode("utf-8") for k in sorted(topics)]
        files = _stdlib_files()
        parts += [f.read_bytes() for f in files]
        return b"\n".join(parts), f"pydoc_data.topics + {len(files)} stdlib .py files"
    p = Path(path)
    if p.is_file():
        return p.read_bytes(), str(p)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        if not files:
            raise ValueError(f"{p} holds no files")
        return b"\n".join(f.read_bytes() for f in files), f"{p} ({len(files)} files)"
    raise ValueError(f"no such corpus: {p}")


class Windows:
    """Token windows over train, dev and validation streams (1-D int64 tensors)."""

    train: torch.Tensor
    dev: torch.Tensor
    val: torch.Tensor

    def train_batches(self, seed: int, batch: int, seq: int):
        """An endless stream of [batch, seq] training windows, the same for every run of a seed."""
        g = torch.Generator().manual_seed(seed)
        hi = self.train.numel() - seq
        while True:
            starts = torch.randint(0, hi, (batch,), generator=g)
            yield torch.stack([self.train[s:s + seq] for s in starts.tolist()])

    def val_windows(self, count: int, seq: int) -> torch.Tensor:
        """[count, seq] windows at evenly spaced offsets across the whole validation split: for
        reporting only."""
        return _spread(self.val, "validation", count, seq)

    def dev_windows(self, count: int, seq: int) -> torch.Tensor:
        """[count, seq] windows spread over the dev split: for selection."""
        return _spread(self.dev, "dev", count, seq)


def _spread(stream: torch.Tensor, name: str, count: int, seq: int) -> torch.Tensor:
    if stream.numel() < seq + 1:
        raise ValueError(f"the {name} split holds {stream.numel()} tokens, less than one window of {seq}")
    starts = np.linspace(0, stream.numel() - seq - 1, count).astype(np.int64)
    return torch.stack([stream[s:s + seq] for s in starts.tolist()])


class Corpus(Windows):
    """Train/validation split by blocks of bytes (vocabulary 256), with window samplers.

    max_bytes keeps evenly spaced blocks only (a smaller corpus that still spans the whole text).
    """

    def __init__(self, data: bytes, description: str, val_every: int = 20, max_bytes: Optional[int] = None):
        arr = np.frombuffer(data, dtype=np.uint8)
        n_blocks = len(arr) // BLOCK
        if n_blocks < 2 * val_every:
            raise ValueError(f"the corpus has {len(arr)} bytes; it needs at least {2 * val_every * BLOCK}")
        blocks = arr[: n_blocks * BLOCK].reshape(n_blocks, BLOCK)
        if max_bytes is not None and max_bytes < len(arr):
            keep = max(2 * val_every, max_bytes // BLOCK)
            blocks = blocks[np.linspace(0, n_blocks - 1, keep).astype(np.int64)]
            n_blocks = keep
        is_val = np.arange(n_blocks) % val_every == val_every - 1
        self.train_bytes = blocks[~is_val].reshape(-1)
        self.val_bytes = blocks[is_val].reshape(-1)
        self.train, self.dev = carve_dev(torch.from_numpy(self.train_bytes.astype(np.int64)))
        self.val = torch.from_numpy(self.val_bytes.astype(np.int64))
        self.description = description
        self.bytes = len(arr)
