"""Token files: what `grouter` commands read as --data.

- ``.npy``: an integer array of token ids (any shape; flattened).
- ``.bin``: a flat raw array of token ids (nanoGPT / Megatron style); its dtype must be given
  (uint8, uint16, uint32 or int32): raw bytes do not say how they were written.
- a folder saved by ``datasets.Dataset.save_to_disk`` with an ``input_ids`` column.
- ``.txt`` (the whole file) and ``.jsonl`` (one JSON object per line, text in ``text_field``),
  tokenised by a tokenizer loaded from a local folder (offline) — for distillation the source's
  own. Without a tokenizer and for a byte-level vocabulary (256), the UTF-8 bytes are the tokens.

Every id is checked: float arrays, negative ids and ids outside the vocabulary raise ValueError
naming the file, its dtype, the offending value and the vocabulary size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_tokens", "RAW_DTYPES"]

RAW_DTYPES = ("uint8", "uint16", "uint32", "int32")


def load_tokens(path: Union[str, Path], dtype: Optional[str] = None, vocab_size: Optional[int] = None,
                tokenizer: Union[str, Path, None] = None, text_field: str = "text") -> Tensor:
    """A 1-D int64 tensor of the token ids in `path` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        ids, described = _datasets_folder(path), f"{path} (datasets input_ids)"
    elif path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
        ids, described = array, f"{path} ({array.dtype})"
    elif path.suffix == ".bin":
        if dtype is None:
            raise ValueError(f"{path}: a raw .bin token file needs its dtype (--dtype {'|'.join(RAW_DTYPES)})")
        if dtype not in RAW_DTYPES:
            raise ValueError(f"--dtype {dtype}: raw token files are {', '.join(RAW_DTYPES)}")
        item = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size % item:
            raise ValueError(f"{path}: {size} bytes is not a whole number of {dtype} ids ({item} bytes each)")
        ids, described = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"), f"{path} ({dtype})"
    elif path.suffix in (".txt", ".jsonl"):
        ids, described = _text(path, tokenizer, vocab_size, text_field), f"{path} (tokenised text)"
    else:
        raise ValueError(f"{path}: unknown token file type {path.suffix or '(no extension)'}; use .npy, .bin with "
                         "--dtype, a datasets folder, .txt or .jsonl")
    return _checked(ids, described, vocab_size)


def _checked(ids, described: str, vocab_size: Optional[int]) -> Tensor:
    array = np.asarray(ids)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{described}: token ids must be integers, got {array.dtype} values")
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError(f"{described}: no tokens")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"{described}: negative token id {low}")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(f"{described}: token id {high} is outside the vocabulary of {vocab_size}")
    return torch.from_numpy(array.astype(np.int64))


def _datasets_folder(path: Path):
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
    rows = ds.with_format("numpy")["input_ids"]
    return np.concatenate([np.asarray(r).reshape(-1) for r in rows]) if len(rows) else np.zeros(0, np.int64)


def _texts(path: Path, text_field: str):
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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


def _text(path: Path, tokenizer, vocab_size: Optional[int], text_field: str):
    texts = _texts(path, text_field)
    if tokenizer is None:
        if vocab_size == 256:  # a byte-level vocabulary: the bytes are the tokens
            return np.frombuffer("".join(texts).encode(), dtype=np.uint8)
        raise ValueError(f"{path}: text needs a tokenizer (--tokenizer FOLDER, a local transformers model or "
                         "tokenizer folder)")
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer could be loaded from it ({e})") from None
    ids = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], dtype=np.int64) for t in texts]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
