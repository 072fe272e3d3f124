"""Folders of raw little-endian arrays with a JSON header: pre-dispatched routes, teacher logits.

The header names the format and its version and gives the shapes; readers refuse a folder whose
header is missing, malformed, of another format, or whose files are not the sizes it implies.
bf16 arrays are stored as their 16-bit patterns (numpy has no bfloat16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_header", "write_header", "check_sizes", "bf16_bits", "from_bf16_bits"]


def read_header(path: Path, fmt: str, version: int, what: str) -> dict:
    """The header of a `fmt` folder of `version`; ValueError naming the problem otherwise."""
    try:
        header = json.loads((path / "header.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} has no header.json: not a {what} folder") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'header.json'} is not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != fmt or header.get("format_version") != version:
        raise ValueError(f"{path} is not a grouter {what} folder of format {version}")
    return header


def write_header(path: Path, header: dict) -> None:
    """Atomically: a kill leaves the old header or the new one, never half of one."""
    tmp = path / "header.json.tmp"
    tmp.write_text(json.dumps(header, indent=2))
    os.replace(tmp, path / "header.json")


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
