"""Token files: what `grouter` commands read as --data.

- ``.npy``: an integer array of token ids; a 1-D array is one stream, the rows of a 2-D array are
  documents.
- ``.bin``: a flat raw array of token ids (nanoGPT / Megatron style), one stream; its dtype must be
  given (uint8, uint16, uint32 or int32): raw bytes do not say how they were written.
- a folder saved by ``datasets.Dataset.save_to_disk`` with an ``input_ids`` column; each row is a
  document. Padding is dropped: positions where an ``attention_mask`` column is 0, else (with
  `pad_id`) the runs of `pad_id` at either end of a row. Rows are joined as they are stored.
- ``.txt`` (the whole file is one document) and ``.jsonl`` (one JSON object per line, text in
  ``text_field``, one document each), tokenised by a tokenizer loaded from a local folder
  (offline) — for distillation the source's own. Documents are separated by the tokenizer's EOS
  token (``separator="eos"``, the default) or joined directly (``separator="none"``). Without a
  tokenizer and for a byte-level vocabulary (256), the UTF-8 bytes are the tokens (joined directly).

Every id is checked: float arrays, negative ids, ids that do not fit int64 and ids outside the
vocabulary raise ValueError naming the file, its dtype, the offending value and the vocabulary
size; so does every unreadable file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_tokens", "load_documents", "load_tokenizer", "Documents", "split_samples", "RAW_DTYPES", "SEPARATORS"]

RAW_DTYPES = ("uint8", "uint16", "uint32", "int32")
SEPARATORS = ("eos", "none")
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class Documents:
    """Token ids [N] (int64) and where each document starts (`starts`, [D + 1] offsets into ids)."""

    ids: Tensor
    starts: Tensor
    source: str  # the file, for messages

    def __len__(self) -> int:
        return self.starts.numel() - 1

    def document(self, i: int) -> Tensor:
        return self.ids[int(self.starts[i]):int(self.starts[i + 1])]

    def select(self, index) -> Tensor:
        """The documents `index` (in that order) joined into one stream."""
        parts = [self.document(int(i)) for i in index]
        return torch.cat(parts) if parts else self.ids[:0]

    def head(self, tokens: int) -> "Documents":
        """The first `tokens` tokens, as documents (the last one cut)."""
        if tokens >= self.ids.numel():
            return self
        starts = torch.cat([self.starts[self.starts < tokens], torch.tensor([tokens])])
        return Documents(self.ids[:tokens], starts, self.source)


def _windows(stream: Tensor, seq_len: int) -> Tensor:
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def split_samples(docs: Documents, seq_len: int, heldout: float, seed: int = 0):
    """(train [n, S], held out [m, S], unit): samples of `seq_len` tokens, the held-out ones chosen
    with `seed`. unit "documents": a `heldout` fraction of whole documents (rows) is held out, and
    each side is joined and cut into samples on its own, so no sample mixes the two; unit "samples"
    (a single stream, or too few documents to hold one out): whole samples are held out."""
    if not 0 < heldout < 1:
        raise ValueError(f"--heldout {heldout}: a fraction in (0, 1) is expected")
    gen = torch.Generator().manual_seed(seed)
    D = len(docs)
    n_held = round(D * heldout)
    if D >= 2 and 1 <= n_held < D:
        order = torch.randperm(D, generator=gen)
        held_docs, train_docs = order[:n_held].sort().values, order[n_held:].sort().values
        train, held = _windows(docs.select(train_docs), seq_len), _windows(docs.select(held_docs), seq_len)
        unit = "documents"
        if held.shape[0] == 0:
            tokens = int(sum(docs.document(int(i)).numel() for i in held_docs))
            raise ValueError(f"{docs.source}: the {n_held} held-out documents hold {tokens} real tokens, not one sample "
                             f"of --seq-len {seq_len}; hold out more (--heldout) or use shorter samples")
    else:
        every = _windows(docs.ids, seq_len)
        n = every.shape[0]
        m = max(1, round(n * heldout))
        if m >= n:
            raise ValueError(f"{docs.source}: {n} samples of {seq_len} tokens are too few to hold some out")
        held_rows = torch.zeros(n, dtype=torch.bool)
        held_rows[torch.randperm(n, generator=gen)[:m]] = True
        train, held, unit = every[~held_rows], every[held_rows], "samples"
    if train.shape[0] == 0:
        raise ValueError(f"{docs.source}: no training samples of --seq-len {seq_len} are left after holding out")
    return train, held, unit


def load_tokens(path: Union[str, Path], dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                tokenizer: Union[str, Path, None] = None, text_field: str = "text", separator: str = "eos",
                pad_id: Optional[int] = None) -> Tensor:
    """A 1-D int64 tensor of the token ids in `path`, documents joined (see the module docstring)."""
    return load_documents(path, dtype, vocab_size, tokenizer, text_field, separator, pad_id).ids


def load_documents(path: Union[str, Path], dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                   tokenizer: Union[str, Path, None] = None, text_field: str = "text", separator: str = "eos",
                   pad_id: Optional[int] = None) -> Documents:
    """The documents of `path` (see the module docstring); padding dropped, separators added."""
    path = Path(path)
    if separator not in SEPARATORS:
        raise ValueError(f"separator must be one of {SEPARATORS}, got {separator!r}")
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        rows, described = _datasets_folder(path, pad_id), f"{path} (datasets input_ids)"
    elif path.suffix == ".npy":
        array = _npy(path)
        rows = [array] if array.ndim <= 1 else list(array.reshape(array.shape[0], -1))
        described = f"{path} ({array.dtype})"
    elif path.suffix == ".bin":
        rows, described = [_raw(path, dtype)], f"{path} ({dtype})"
    elif path.suffix in (".txt", ".jsonl"):
        rows, described = _text(path, tokenizer, vocab_size, text_field, separator), f"{path} (tokenised text)"
    else:
        raise ValueError(f"{path}: unknown token file type {path.suffix or '(no extension)'}; use .npy, .bin with "
                         "--dtype, a datasets folder, .txt or .jsonl")
    return _checked(rows, described, vocab_size)


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None


def _raw(path: Path, dtype: Optional[str]) -> np.ndarray:
    if dtype is None:
        raise ValueError(f"{path}: a raw .bin token file needs its dtype (--dtype {'|'.join(RAW_DTYPES)})")
    if dtype not in RAW_DTYPES:
        raise ValueError(f"--dtype {dtype}: raw token files are {', '.join(RAW_DTYPES)}")
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % item:
        raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} ids ({item} bytes each)")
    if size == 0:
        return np.zeros(0, dtype=np.dtype(dtype))
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def _checked(rows: List[np.ndarray], described: str, vocab_size: Optional[int]) -> Documents:
    kinds = {np.asarray(r).dtype.kind for r in rows}
    if kinds - set("iu"):
        bad = next(np.asarray(r).dtype for r in rows if np.asarray(r).dtype.kind not in "iu")
        raise ValueError(f"{described}: token ids must be integers, got {bad} values")
    lengths = [int(np.asarray(r).size) for r in rows]
    if sum(lengths) == 0:
        raise ValueError(f"{described}: no tokens")
    low = min(int(np.min(r)) for r in rows if np.asarray(r).size)
    high = max(int(np.max(r)) for r in rows if np.asarray(r).size)
    if low < 0:
        raise ValueError(f"{described}: negative token id {low}")
    if high > _INT64_MAX:
        raise ValueError(f"{described}: token id {high} does not fit int64")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(f"{described}: token id {high} is outside the vocabulary of {vocab_size}")
    ids = np.concatenate([np.asarray(r).reshape(-1).astype(np.int64) for r in rows])
    starts = torch.zeros(len(rows) + 1, dtype=torch.long)
    starts[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return Documents(torch.from_numpy(ids), starts, described)


def _datasets_folder(path: Path, pad_id: Optional[int]) -> List[np.ndarray]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading a datasets folder needs the `datasets` package") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any unreadable folder
        raise ValueError(f"{path}: not a folder saved by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    if "input_ids" not in ds.column_names:
        raise ValueError(f"{path}: no input_ids column (columns: {', '.join(ds.column_names)})")
    table = ds.with_format("numpy")
    rows = [np.asarray(r).reshape(-1) for r in table["input_ids"]]
    if "attention_mask" in ds.column_names:
        masks = [np.asarray(m).reshape(-1) for m in table["attention_mask"]]
        for i, (r, m) in enumerate(zip(rows, masks)):
            if r.shape != m.shape:
                raise ValueError(f"{path}: row {i} has {r.size} input_ids and {m.size} attention_mask values")
        return [r[m != 0] for r, m in zip(rows, masks)]
    if pad_id is not None:
        return [_strip(r, pad_id) for r in rows]
    return rows


def _strip(row: np.ndarray, pad_id: int) -> np.ndarray:
    real = np.flatnonzero(row != pad_id)
    return row[real[0]:real[-1] + 1] if real.size else row[:0]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def _texts(path: Path, text_field: str) -> List[str]:
    if path.suffix == ".txt":
        return [_read_text(path)]
    texts = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            raise ValueError(f"{path}:{n}: no text field {text_field!r} (--text-field)")
        texts.append(row[text_field])
    return texts


def load_tokenizer(folder: Union[str, Path], what: str = "--tokenizer"):
    """A transformers tokenizer from a local folder (never a hub id); ValueError naming the problem."""
    given, folder = str(folder), Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} {given}: no such folder (a local tokenizer or model folder is expected; nothing "
                         "is downloaded)")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or ["no message"])[0]
        raise ValueError(f"{what} {given}: no tokenizer could be loaded from it ({first})") from None


def _text(path: Path, tokenizer, vocab_size: Optional[int], text_field: str, separator: str) -> List[np.ndarray]:
    texts = _texts(path, text_field)
    if tokenizer is None:
        if vocab_size == 256:  # a byte-level vocabulary: the bytes are the tokens
            return [np.frombuffer(t.encode(), dtype=np.uint8) for t in texts]
        raise ValueError(f"{path}: text needs a tokenizer (--tokenizer FOLDER, a local transformers model or "
                         "tokenizer folder)")
    tok = tokenizer if not isinstance(tokenizer, (str, Path)) else load_tokenizer(tokenizer)
    eos = getattr(tok, "eos_token_id", None)
    if separator == "eos" and eos is None and len(texts) > 1:
        raise ValueError(f"{path}: the tokenizer has no EOS token to separate documents with; pass --doc-separator "
                         "none to join them directly")
    docs = []
    for t in texts:
        ids = list(tok(t, add_special_tokens=False)["input_ids"])
        if separator == "eos" and len(texts) > 1:
            ids.append(eos)
        docs.append(np.asarray(ids, dtype=np.int64))
    return docs
