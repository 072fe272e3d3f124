"""A context-free router: a token id -> K experts table, the format hash-routing engines consume.

`TableRouter.from_routes` reads a contextual router's routes over data and keeps, for every token
id, the expert set it was routed to most often (ties: the lowest set) with that set's mean gate
weights; ids never seen take the router's route of the id alone. Saved as one safetensors file:
``expert_ids`` [vocab, K] int32, ``weights`` [vocab, K] float32, and metadata (format, experts,
source). `route` looks the ids up; a TableRouter attaches to a transformers model like a Grouter
(grouter.hf.attach), but is not saved with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["TableRouter", "table_agreement"]

FORMAT = "grouter-table"
FORMAT_VERSION = 1


class TableRouter(nn.Module):
    """Routes every token by its id alone: expert_ids [vocab, K] and gate weights [vocab, K]."""

    def __init__(self, expert_ids: Tensor, weights: Tensor, num_experts: int, source: str = ""):
        super().__init__()
        if expert_ids.dim() != 2 or weights.shape != expert_ids.shape:
            raise ValueError(f"TableRouter: expert_ids {tuple(expert_ids.shape)} and weights {tuple(weights.shape)} "
                             "must both be [vocab, K]")
        if expert_ids.dtype.is_floating_point or not weights.dtype.is_floating_point:
            raise ValueError(f"TableRouter: integer expert ids and floating weights, got {expert_ids.dtype} and "
                             f"{weights.dtype}")
        if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
            raise ValueError(f"TableRouter: expert ids must lie in [0, {num_experts})")
        if expert_ids.shape[1] > 1 and bool((expert_ids.sort(1).values.diff(dim=1) == 0).any()):
            raise ValueError("TableRouter: a token's K experts must be distinct")
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("TableRouter: gate weights must be finite and non-negative")
        self.register_buffer("expert_ids", expert_ids.to(torch.int64))
        self.register_buffer("weights", weights.to(torch.float32))
        self.num_experts, self.source = int(num_experts), source

    @property
    def vocab_size(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    def route(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cache=None) -> Tuple[Tensor, Tensor]:
        """(expert ids [..., K], weights [..., K]) of token ids [...]; the mask and cache change nothing
        (a token's route depends on its id alone)."""
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"TableRouter.route: token ids must be integers, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.vocab_size)]
            raise ValueError(f"TableRouter.route: token id {int(bad.flatten()[0])} is outside the table's vocabulary "
                             f"of {self.vocab_size}")
        flat = input_ids.reshape(-1).to(self.expert_ids.device)
        shape = (*input_ids.shape, self.top_k)
        return self.expert_ids[flat].reshape(shape), self.weights[flat].reshape(shape)

    @classmethod
    @torch.no_grad()
    def from_routes(cls, router, batches: Iterable[Tensor], source: str = "") -> "TableRouter":
        """The table of `router` (a Grouter, or anything with route() and num_experts/top_k/vocab_size)
        over token batches [B, S]: each id's most frequent expert set, with its mean weights."""
        V, K, E = router.vocab_size, router.top_k, router.num_experts
        tokens, ids, weights = [], [], []
        for b in batches:
            i, w = router.route(b)
            tokens.append(b.reshape(-1).cpu())
            ids.append(i.reshape(-1, K).cpu())
            weights.append(w.reshape(-1, K).float().cpu())
        counts_ids, mean_w, seen = _most_frequent_sets(torch.cat(tokens) if tokens else torch.empty(0, dtype=torch.long),
                                                       torch.cat(ids) if ids else torch.empty(0, K, dtype=torch.long),
                                                       torch.cat(weights) if weights else torch.empty(0, K), V)
        unseen = (~seen).nonzero().flatten()
        if unseen.numel():  # each id alone, as a one-token sequence
            device = next(iter(router.parameters()), torch.empty(0)).device if isinstance(router, nn.Module) else "cpu"
            i, w = router.route(unseen.view(-1, 1).to(device))
            order = i.reshape(-1, K).cpu().sort(1)
            counts_ids[unseen] = order.values
            mean_w[unseen] = w.reshape(-1, K).float().cpu().gather(1, order.indices)
        return cls(counts_ids, mean_w, E, source=source)

    def save(self, path: Union[str, Path]) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format=FORMAT, format_version=str(FORMAT_VERSION), num_experts=str(self.num_experts),
                    source=self.source, checksum=self.checksum())
        save_file({"expert_ids": self.expert_ids.to(torch.int32).contiguous().cpu(),
                   "weights": self.weights.contiguous().cpu()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "TableRouter":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"TableRouter.load: {path} is not a file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise ValueError(f"TableRouter.load: {path} is not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"TableRouter.load: {path} is not a grouter table of format {FORMAT_VERSION} "
                             f"(metadata {json.dumps(meta)[:200]})")
        if set(tensors) != {"expert_ids", "weights"}:
            raise ValueError(f"TableRouter.load: {path} holds {sorted(tensors)}, expected expert_ids and weights")
        table = cls(tensors["expert_ids"], tensors["weights"], int(meta["num_experts"]), meta.get("source", ""))
        if table.checksum() != meta.get("checksum"):
            raise ValueError(f"TableRouter.load: {path} does not match its recorded checksum")
        return table.to(map_location)

    def checksum(self) -> str:
        h = hashlib.sha256()
        h.update(self.expert_ids.to(torch.int32).cpu().numpy().tobytes())
        h.update(self.weights.cpu().numpy().tobytes())
        h.update(str(self.num_experts).encode())
        return h.hexdigest()


def _most_frequent_sets(tokens: Tensor, ids: Tensor, weights: Tensor, vocab: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(table ids [V, K] sorted, mean weights [V, K] in that order, seen [V] bool)."""
    K = ids.shape[1]
    order = ids.sort(1)
    sets, w = order.values, weights.gather(1, order.indices)
    keys, inverse, counts = torch.unique(torch.cat([tokens.view(-1, 1), sets], 1), dim=0, return_inverse=True,
                                         return_counts=True)
    sums = torch.zeros(keys.shape[0], K).index_add_(0, inverse, w)
    # per token the key with the most occurrences: keys by falling count (stable: unique sorted the
    # keys, so equal counts keep the lowest set first), then by token, first key of each token
    by_count = torch.argsort(counts, descending=True, stable=True)
    ranked = by_count[torch.argsort(keys[by_count, 0], stable=True)]
    token_of = keys[ranked, 0]
    first = torch.ones_like(token_of, dtype=torch.bool)
    first[1:] = token_of[1:] != token_of[:-1]
    best = torch.zeros(vocab, dtype=torch.long)
    best[token_of[first]] = ranked[first]
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[token_of[first]] = True
    table = torch.zeros(vocab, K, dtype=torch.long)
    mean = torch.zeros(vocab, K)
    table[seen] = keys[best[seen], 1:]
    mean[seen] = sums[best[seen]] / counts[best[seen]].unsqueeze(1)
    return table, mean, seen


def table_agreement(table: TableRouter, router, batches: Iterable[Tensor]) -> Dict[str, float]:
    """How the table's routes agree with `router`'s contextual routes on `batches`: the fraction of
    tokens given the same expert set, and the mean fraction of each token's K experts shared."""
    same = shared = n = 0
    with torch.no_grad():
        for b in batches:
            a = router.route(b)[0].reshape(-1, table.top_k).cpu().sort(1).values
            t = table.route(b.cpu())[0].reshape(-1, table.top_k).cpu().sort(1).values
            same += int((a == t).all(1).sum())
            shared += float((a.unsqueeze(2) == t.unsqueeze(1)).any(2).float().mean(1).sum())
            n += a.shape[0]
    return dict(same_set=same / max(n, 1), shared_experts=shared / max(n, 1), tokens=n)
