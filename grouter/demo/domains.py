"""The study's two domains, cut from what every Python install has.

  prose  the standard library's docstrings and comments, plus pydoc's topics (English about code)
  code   the same files with docstrings and comments removed (Python without English)

Both are encoded with the main corpus's BPE (a Grouter reads token ids: a router distilled on one
domain can only route another that shares its vocabulary), and split into train / dev /
validation the main corpus's way.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

DOMAINS = ("prose", "code")


def _docstring_nodes(tree: ast.AST) -> List[ast.Constant]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.append(first.value)
    return out


def split_python(source: str) -> Tuple[str, str]:
    """(prose, code) of one Python source: its docstrings' text and comments, and the source with
    both removed. Raises SyntaxError (or tokenize.TokenError) for what Python cannot parse."""
    lines = source.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line) for line in lines]).tolist()

    def at(row: int, col: int, byte_col: bool = False) -> int:
        """(1-based row, 0-based column) -> index into source; ast counts columns in UTF-8 bytes,
        tokenize in characters."""
        if row > len(lines):
            return len(source)
        if byte_col:
            col = len(lines[row - 1].encode("utf-8")[:col].decode("utf-8", "replace"))
        return offsets[row - 1] + col

    spans, prose = [], []
    for node in _docstring_nodes(ast.parse(source)):
        spans.append((at(node.lineno, node.col_offset, True), at(node.end_lineno, node.end_col_offset, True)))
        prose.append(node.value.strip())
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            spans.append((at(*tok.start), at(*tok.end)))
            prose.append(tok.string.lstrip("#").strip())
    code, pos = [], 0
    for start, end in sorted(spans):
        if start >= pos:
            code.append(source[pos:start])
            pos = end
    code.append(source[pos:])
    kept = "".join(code)
    # drop what a removed docstring or comment leaves: blank lines, trailing spaces
    code_text = "".join(line.rstrip() + "\n" for line in kept.splitlines() if line.strip())
    return "\n".join(p for p in prose if p) + "\n", code_text


def domain_bytes(files: List[Path], topics: Dict[str, str]) -> Dict[str, bytes]:
    """{"prose": ..., "code": ...} of the given source files (those Python cannot parse are left out)
    and pydoc's topics (prose)."""
    prose = [topics[k] for k in sorted(topics)]
    code = []
    for f in files:
        try:
            p, c = split_python(f.read_bytes().decode("utf-8"))
        except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError):
            continue
        prose.append(p)
        code.append(c)
    return dict(prose="\n".join(prose).encode("utf-8"), code="\n".join(code).encode("utf-8"))
