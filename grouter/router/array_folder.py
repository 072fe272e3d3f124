"""Folders of raw little-endian arrays with a JSON header: pre-dispatched routes, teacher logits.

The header names the format and its version, gives the shapes and carries a sha256 of itself;
readers refuse a folder whose header is missing, malformed, edited, of another format, has a field
of the wrong type or range, or whose files are not the sizes it implies. Samples carry a digest of
their bytes (`digests.bin`, 16 bytes each), checked when they are read. bf16 arrays are stored as
their 16-bit patterns (numpy has no bfloat16). Files are opened read-only until every check passed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_header", "write_header", "check_sizes", "bf16_bits", "from_bf16_bits", "positive_int", "sample_digest",
           "verify_digests", "DIGEST_BYTES"]

DIGEST_BYTES = 16
_CHECKSUM = "header_sha256"


def positive_int(value) -> bool:
    return type(value) is int and value >= 1


def _header_sha256(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != _CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_header(path: Path, fmt: str, version: int, what: str,
                fields: Optional[Dict[str, Callable[[object], bool]]] = None) -> dict:
    """The header of a `fmt` folder of `version`, its checksum and `fields` (name -> test of the
    value) verified; ValueError naming the problem otherwise."""
    file = path / "header.json"
    try:
        header = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} has no header.json: not a {what} folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise ValueError(f"{path} is not a grouter {what} folder")
    if header.get("format_version") != version:
        raise ValueError(f"{path} is a {what} folder of format {header.get('format_version')!r}; this grouter reads "
                         f"format {version} (write it again)")
    if header.get(_CHECKSUM) != _header_sha256(header):
        raise ValueError(f"{file} does not match its checksum: it was edited or damaged")
    for name, ok in (fields or {}).items():
        if not ok(header.get(name)):
            raise ValueError(f"{file}: invalid {name} {header.get(name)!r}")
    return header


def write_header(path: Path, header: dict) -> None:
    """Atomically, with its checksum: a kill leaves the old header or the new one, never half of one."""
    header = {**header, _CHECKSUM: _header_sha256(header)}
    tmp = path / "header.json.tmp"
    tmp.write_text(json.dumps(header, indent=2))
    os.replace(tmp, path / "header.json")


def sample_digest(*rows: np.ndarray) -> np.ndarray:
    """A 16-byte digest of one sample's rows (its bytes in every file)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for row in rows:
        h.update(np.ascontiguousarray(row).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def verify_digests(path: Path, digests: np.ndarray, arrays: list, start: int, end: int) -> None:
    """Samples start:end of `arrays` match their stored digests; ValueError naming the first that does not."""
    for i in range(start, end):
        if not np.array_equal(sample_digest(*(a[i] for a in arrays)), digests[i]):
            raise ValueError(f"{path}: sample {i} does not match its digest (a file was changed or damaged after "
                             "it was written)")


def check_sizes(path: Path, expect: Dict[str, int]) -> None:
    """Each file of `expect` exists with exactly that many bytes."""
    for name, size in expect.items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise ValueError(f"{path / name}: {actual} bytes, the header says {size}")


def bf16_bits(t: Tensor) -> np.ndarray:
    """The little-endian 16-bit patterns of t rounded to bf16, for a "<u2" array."""
    return t.to(torch.bfloat16).cpu().view(torch.int16).numpy().view("<u2")


def from_bf16_bits(bits) -> Tensor:
    """A bf16 tensor from stored 16-bit patterns (a copy: memory maps stay read-only)."""
    return torch.from_numpy(np.array(bits).view(np.int16)).view(torch.bfloat16)
