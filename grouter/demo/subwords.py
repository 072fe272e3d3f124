"""The demo's subword tokens: a byte-level BPE trained offline on the training split only.

The corpus's two byte streams are decoded as UTF-8 (invalid bytes become U+FFFD), the BPE is
trained on the training text, and both texts are encoded once and cached in a folder. Every loss
is reported in nats per byte: a window's summed cross-entropy over the UTF-8 bytes its predicted
tokens decode to, so figures stay comparable with a byte-level model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .corpus import Corpus, Windows, carve_dev

CHUNK = 1 << 16  # characters per encode_batch item, cut at a line end


def _chunks(text: str) -> List[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _text(data: np.ndarray) -> str:
    return data.tobytes().decode("utf-8", errors="replace")


def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-split, no prefix space, no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 <= vocab_size <= 65536:  # ids are cached as uint16
        raise ValueError(f"the BPE vocabulary must lie in [256, 65536], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(_chunks(text), trainer)
    return tok


def token_bytes(tok) -> torch.Tensor:
    """[vocab] UTF-8 bytes each token decodes to: one byte per character of the byte-level alphabet."""
    lengths = torch.zeros(tok.get_vocab_size(), dtype=torch.int64)
    for piece, i in tok.get_vocab().items():
        lengths[i] = len(piece)
    return lengths


def encode(tok, text: str) -> np.ndarray:
    return np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(_chunks(text))])


class TokenCorpus(Windows):
    """The corpus as BPE token ids (train / dev / validation), with the bytes each token stands for.
    `train` (what runs train on) excludes dev (corpus.carve_dev)."""

    def __init__(self, train: np.ndarray, val: np.ndarray, bytes_per_token: torch.Tensor, description: str):
        self.train, self.dev = carve_dev(torch.from_numpy(train.astype(np.int64)))
        self.val = torch.from_numpy(val.astype(np.int64))
        self.token_bytes = bytes_per_token
        self.vocab_size = int(bytes_per_token.numel())
        self.description = description

    def frequencies(self) -> torch.Tensor:
        """[vocab] occurrences of each token in the training split."""
        return torch.bincount(self.train, minlength=self.vocab_size)

    def summary(self) -> dict:
        tr = int(self.token_bytes[self.train].sum())
        return dict(kind="bpe", vocab_size=self.vocab_size, train_tokens=int(self.train.numel()),
                    dev_tokens=int(self.dev.numel()), val_tokens=int(self.val.numel()),
                    bytes_per_token=tr / max(1, self.train.numel()))


def build_token_corpus(corpus: Corpus, vocab_size: int, folder: Path, reuse: bool = True,
                       tokenizer: Optional[Path] = None) -> TokenCorpus:
    """Train the BPE on corpus's training split and encode both splits, or (reuse) read back what
    `folder` holds for the same corpus and vocabulary. tokenizer: encode with this saved BPE instead
    of training one (another corpus in the same vocabulary)."""
    folder = Path(folder)
    meta_path = folder / "tokens.json"
    key = dict(vocab_size=vocab_size, corpus=corpus.description, train_bytes=int(corpus.train_bytes.size),
               val_bytes=int(corpus.val_bytes.size), tokenizer=None if tokenizer is None else str(tokenizer))
    if reuse and meta_path.exists() and json.loads(meta_path.read_text()) == key:
        return load_token_corpus(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    train_text = _text(corpus.train_bytes)
    if tokenizer is None:
        tok = train_bpe(train_text, vocab_size)
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        if tok.get_vocab_size() != vocab_size:
            raise ValueError(f"{tokenizer} has {tok.get_vocab_size()} tokens, not {vocab_size}")
    train, val = encode(tok, train_text), encode(tok, _text(corpus.val_bytes))
    tok.save(str(folder / "tokenizer.json"))
    np.save(folder / "train.npy", train)
    np.save(folder / "val.npy", val)
    meta_path.write_text(json.dumps(key))  # last: a folder without it is rebuilt
    return TokenCorpus(train, val, token_bytes(tok), corpus.description)


def load_token_corpus(folder: Path) -> TokenCorpus:
    """The token corpus a demo cached in `folder` (`<out>/stages/tokens`)."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    meta_path = folder / "tokens.json"
    if not meta_path.exists():
        raise ValueError(f"{folder} holds no finished token corpus (no tokens.json)")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return TokenCorpus(np.load(folder / "train.npy"), np.load(folder / "val.npy"), token_bytes(tok),
                       json.loads(meta_path.read_text())["corpus"])
