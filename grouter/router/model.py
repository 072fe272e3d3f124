"""The Grouter: a small standalone router that reads token ids (arXiv 2603.06626).

    G(X) = W_s · Enc_N(Emb(X))

token embedding -> N pre-norm transformer blocks (RMSNorm, rotary positions, SwiGLU) -> RMSNorm ->
the final projection W_s (optionally with a bias) to one logit per expert.

Causal by default: position t attends to positions <= t only, so its route depends only on its
prefix, as an autoregressive model needs. `causal=False` is the paper's bidirectional encoder;
its routes see future tokens, which leaks them into a language model's training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import Attention

__all__ = ["Grouter", "GrouterCache", "Attention", "FORMAT_VERSION", "state_sha256"]

FORMAT_VERSION = 1
_WEIGHTS, _CONFIG = "model.safetensors", "config.json"


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, causal: bool, rope_base: float):
        super().__init__()
        self.attn = Attention(d_model, n_heads, causal, rope_base)
        self.mlp_norm = nn.RMSNorm(d_model)
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                past: Optional[list] = None) -> Tensor:
        x = x + self.attn(x, positions, attn_mask, past)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class GrouterCache:
    """The Grouter's own key/value cache, for routing a sequence token by token (cached generation).

    Holds per block the keys and values of the P positions routed so far, which of them are real
    tokens (`key_mask`, [B, P]) and how many real tokens each row has seen (`seen`, [B]), so that
    each new token is routed from its whole prefix with O(1) Grouter work per token. The methods
    below mirror transformers' cache operations, so the routes follow beam search and the like.
    """

    def __init__(self):
        self.layers: Optional[list] = None  # [[keys, values] [B, heads, P, d]] per block
        self.key_mask: Optional[Tensor] = None
        self.seen: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    @property
    def batch_size(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[0]

    def reset(self) -> None:
        self.layers = self.key_mask = self.seen = None

    def _map_rows(self, fn) -> None:
        if self.key_mask is None:
            return
        self.layers = [[fn(k), fn(v)] for k, v in self.layers]
        self.key_mask, self.seen = fn(self.key_mask), fn(self.seen)

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` (beam search's reorder, or a batch selection)."""
        self._map_rows(lambda t: t.index_select(0, index.to(t.device)))

    def repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (a negative length drops that many from the end)."""
        if self.key_mask is None:
            return
        length = length if length >= 0 else max(self.length + length, 0)
        if length >= self.length:
            return
        self.layers = [[k[:, :, :length], v[:, :, :length]] for k, v in self.layers]
        self.key_mask = self.key_mask[:, :length]
        self.seen = self.key_mask.sum(1)


class Grouter(nn.Module):
    """Token ids [B, S] -> expert logits [B, S, E]; `route` gives top-k ids and gate weights."""

    def __init__(self, vocab_size: int, num_experts: int, top_k: int, d_model: int = 512, n_layers: int = 3,
                 n_heads: int = 8, causal: bool = True, d_ff: Optional[int] = None, bias: bool = False,
                 score: str = "softmax", scaling: float = 1.0, rope_base: float = 10000.0,
                 source: Optional[str] = None, expert_order: Optional[Sequence[int]] = None):
        """expert_order: which expert of the Grouter as distilled (or folded) each expert is, when
        they were renumbered (grouter.parallel.relabel_experts sets it); None: not renumbered."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if not causal:
            warnings.warn("Grouter(causal=False) is the paper's bidirectional encoder: a token's route then "
                          "depends on the tokens after it, which leaks future tokens into an autoregressive "
                          "model's training and evaluation", stacklevel=2)
        d_ff = d_ff or 4 * d_model
        self.config: Dict[str, Any] = dict(
            vocab_size=vocab_size, num_experts=num_experts, top_k=top_k, d_model=d_model, n_layers=n_layers,
            n_heads=n_heads, causal=causal, d_ff=d_ff, bias=bias, score=score, scaling=scaling,
            rope_base=rope_base, source=source)
        if expert_order is not None:  # only when renumbered: other configs stay as they were
            order = [int(i) for i in expert_order]
            if sorted(order) != list(range(num_experts)):
                raise ValueError(f"expert_order must be a permutation of 0..{num_experts - 1}")
            self.config["expert_order"] = order
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff, causal, rope_base) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model)
        self.proj = nn.Linear(d_model, num_experts, bias=bias)  # W_s
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * len(self.blocks)) if name.endswith(("out.weight", "down.weight")) else 1))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def expert_order(self) -> Tensor:
        """LongTensor [E]: the id each expert had as distilled (or folded); 0..E-1 unless renumbered."""
        order = self.config.get("expert_order")
        n = self.config["num_experts"]
        return torch.arange(n, device="cpu") if order is None else torch.tensor(order, device="cpu")

    # Constructor arguments, readable as attributes (g.num_experts, g.causal, ...).
    def __getattr__(self, name: str):
        config = self.__dict__.get("config")
        if config is not None and name in config:
            return config[name]
        return super().__getattr__(name)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                cache: Optional["GrouterCache"] = None) -> Tensor:
        """Expert logits [B, S, E] of token ids [B, S] (or [S] -> [S, E]).

        attention_mask [B, S] (or [B, P+S] with a cache of P positions, as transformers passes it):
        0 marks padding. A padded row's real tokens get exactly the logits of the unpadded sequence:
        padding is never attended and not counted in positions. A pad position itself is routed
        as its own token alone at position 0, so its route never depends on the rest of the row.
        cache: a `GrouterCache`; the call routes the next S tokens of each row from their whole
        prefix and appends them to the cache (a causal Grouter only).
        """
        if input_ids.dim() == 1:
            mask = None if attention_mask is None else attention_mask.reshape(1, -1)
            return self.forward(input_ids[None], mask, cache)[0]
        if input_ids.dim() != 2:
            raise ValueError(f"Grouter reads token ids [B, S] or [S], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int32, torch.int64, torch.uint8, torch.int16):
            raise ValueError(f"Grouter reads token ids (an integer tensor), got {input_ids.dtype}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"Grouter: token id {low if low < 0 else high} is outside its vocabulary "
                                 f"[0, {self.vocab_size})")
        x = self.embed(input_ids.long())
        if attention_mask is None and cache is None:  # whole unpadded sequences: the fast path
            for block in self.blocks:
                x = block(x)
            return self.proj(self.norm(x))
        positions, allowed, keys, seen = self._masks(input_ids, attention_mask, cache)
        pasts = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, past in zip(self.blocks, pasts):
            x = block(x, positions, allowed, past)
        if cache is not None:
            cache.key_mask, cache.seen = keys, seen
        return self.proj(self.norm(x))

    def _masks(self, input_ids: Tensor, attention_mask: Optional[Tensor], cache: Optional["GrouterCache"]):
        """Positions [B, S], attention mask [B, S, P+S], the cache's next key mask and token counts."""
        B, S = input_ids.shape
        device = input_ids.device
        P = 0
        if cache is not None:
            if not self.causal:
                raise ValueError("a bidirectional Grouter (causal=False) cannot route incrementally: its routes "
                                 "of earlier tokens change with every new token; route whole sequences instead")
            P = cache.length
            if P and cache.batch_size != B:
                raise ValueError(f"the Grouter cache holds {cache.batch_size} rows, the input has {B}")
            if not P:
                cache.layers = [[None, None] for _ in self.blocks]
        if attention_mask is None:
            new = torch.ones(B, S, dtype=torch.bool, device=device)
            keys = new if not P else torch.cat((cache.key_mask, new), 1)
        else:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (S, P + S):
                raise ValueError(f"attention_mask must be [B, S] or [B, P+S] = [{B}, {S}] or [{B}, {P + S}] "
                                 f"(P = {P} cached positions), got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device) != 0
            if mask.shape[1] == P + S:
                keys, new = mask, mask[:, P:]
            else:
                new = mask
                keys = new if not P else torch.cat((cache.key_mask, new), 1)
        seen = cache.seen if P else torch.zeros(B, dtype=torch.long, device=device)
        positions = (seen[:, None] + new.cumsum(1) - 1).masked_fill(~new, 0)
        query = torch.arange(P, P + S, device=device)[:, None]
        key = torch.arange(P + S, device=device)[None, :]
        allowed = keys[:, None, :]
        if self.causal:
            allowed = allowed & (key <= query)
        # A pad query attends only to itself: its route is its token's alone, at position 0.
        allowed = torch.where(new[:, :, None], allowed, key == query)
        return positions, allowed, keys, seen + new.sum(1)

    def scores(self, logits: Tensor) -> Tensor:
        return logits.float().softmax(-1) if self.score == "softmax" else logits.float().sigmoid()

    def route_logits(self, logits: Tensor, top_k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Top-k of the logits; weights = softmax over the selected logits (or normalised sigmoid
        scores), times `scaling`."""
        top, ids = logits.float().topk(top_k or self.top_k, dim=-1)
        w = top.softmax(-1) if self.score == "softmax" else top.sigmoid() / top.sigmoid().sum(-1, keepdim=True)
        return ids, w * self.scaling

    @torch.no_grad()
    def route(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cache: Optional["GrouterCache"] = None,
              return_logits: bool = False):
        """(expert ids [..., K] int64, weights [..., K] float32) for token ids [..., S]; with
        `return_logits`, also the logits [..., E]. `attention_mask` and `cache` as in `forward`."""
        logits = self(input_ids, attention_mask, cache)
        ids, w = self.route_logits(logits)
        return (ids, w, logits) if return_logits else (ids, w)

    # --- artifacts -----------------------------------------------------------------------------

    def checksum(self) -> str:
        """sha256 over the parameters' names, shapes, dtypes and bytes: identifies these weights."""
        return state_sha256(self)

    def save(self, path: Union[str, Path]) -> Path:
        """Write `model.safetensors` and `config.json` (format version, constructor arguments, checksum)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path / _WEIGHTS))
        meta = dict(format="grouter", format_version=FORMAT_VERSION, config=self.config,
                    config_sha256=_config_sha256(self.config), checksum=self.checksum(),
                    file_sha256=_sha256(path / _WEIGHTS))
        (path / _CONFIG).write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: Union[str, Path], map_location: str = "cpu") -> "Grouter":
        """Load a saved Grouter; any missing, truncated, corrupt or mismatched file raises ValueError."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (_CONFIG, _WEIGHTS):
            if not (path / name).is_file():
                raise ValueError(f"Grouter.load: {path / name} is missing")
        try:
            meta = json.loads((path / _CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"Grouter.load: {path / _CONFIG} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != "grouter":
            raise ValueError(f"Grouter.load: {path / _CONFIG} is not a grouter config")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"Grouter.load: format version {meta.get('format_version')} (this grouter reads {FORMAT_VERSION})")
        if not isinstance(meta.get("config"), dict) or _config_sha256(meta["config"]) != meta.get("config_sha256"):
            raise ValueError(f"Grouter.load: the model arguments in {path / _CONFIG} were altered or are missing")
        if _sha256(path / _WEIGHTS) != meta.get("file_sha256"):
            raise ValueError(f"Grouter.load: {path / _WEIGHTS} does not match its config (truncated or corrupt)")
        try:
            tensors = load_file(str(path / _WEIGHTS), device=map_location)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a bidirectional Grouter warns at construction
                g = cls(**meta["config"])
            g.load_state_dict(tensors, strict=True)
        except Exception as e:  # noqa: BLE001 - any failure means no model, never half a model
            raise ValueError(f"Grouter.load: cannot load {path}: {e}") from None
        if g.checksum() != meta.get("checksum"):
            raise ValueError(f"Grouter.load: the weights in {path} do not match the recorded checksum")
        return g.to(map_location)

    def extra_repr(self) -> str:
        c = self.config
        return f"experts={c['num_experts']}, top_k={c['top_k']}, causal={c['causal']}, score={c['score']!r}"


def state_sha256(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's state (parameters and buffers)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the bytes
    return h.hexdigest()


def _config_sha256(config: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
