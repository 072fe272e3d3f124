"""Real-size transformers MoE checkpoints with random weights, written shard by shard (never a whole
model in memory), for measuring `grouter distill` against the bytes it must read.

Shapes follow the published configs. The embeddings and the first `dense_layers` decoder layers get
random bf16 weights; the layers above (never read when distilling MoE layer 0) are written as zeros
into sparse files when `sparse_rest` is set, so a 60 GB checkpoint fits a small disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

SHAPES = {
    "olmoe-1b-7b": ("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                        num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                        num_experts_per_tok=8, max_position_embeddings=4096)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                             num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                             head_dim=128, num_experts=128, num_experts_per_tok=8,
                                             moe_intermediate_size=768, max_position_embeddings=4096,
                                             tie_word_embeddings=False)),
}
_DONE = "grouter_bench_complete"


def _header(tensors: Dict[str, tuple]) -> bytes:
    offset, meta = 0, {"__metadata__": {"format": "pt"}}
    for name, shape in tensors.items():
        size = 2 * int(torch.Size(shape).numel())
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(file: Path, tensors: Dict[str, tuple], random: bool, gen: torch.Generator) -> int:
    header = _header(tensors)
    with open(file, "wb") as f:
        f.write(header)
        total = 0
        for name, shape in tensors.items():
            n = int(torch.Size(shape).numel())
            total += 2 * n
            if not random:
                continue
            std = 1.0 if name.endswith("norm.weight") else (0.5 if name.endswith("gate.weight") else 0.02)
            for start in range(0, n, 1 << 26):  # 64M values at a time
                chunk = torch.randn(min(1 << 26, n - start), generator=gen) * std
                if name.endswith("norm.weight"):
                    chunk = 1 + 0.1 * chunk
                f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        if not random:
            f.truncate(len(header) + total)  # a hole: zeros, no disk used
    return total


def make_real_source(path: Path, shape: str, dense_layers: int = 1, sparse_rest: bool = False) -> None:
    """Write the checkpoint once; a folder marked complete is reused."""
    import transformers

    if (path / _DONE).is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    config_cls, kwargs = SHAPES[shape]
    config = getattr(transformers, config_cls)(**kwargs, dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config.architectures = [type(model).__name__]
    config.save_pretrained(path)
    groups: Dict[str, Dict[str, tuple]] = {}
    for name, s in shapes.items():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else ("embed" if "embed" in name else "head")
        groups.setdefault(key, {})[name] = s
    gen = torch.Generator().manual_seed(0)
    names = sorted(groups, key=lambda k: (k != "embed", k))
    weight_map, total = {}, 0
    for i, key in enumerate(names):
        file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        random = not sparse_rest or key == "embed" or (key.startswith("layer") and int(key[5:]) < dense_layers)
        total += _write_shard(path / file, groups[key], random, gen)
        weight_map.update({name: file for name in groups[key]})
        print(f"  wrote {file} ({key}{'' if random else ', sparse zeros'})", flush=True)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / _DONE).write_text("ok")


def loaded_bytes(path: Path, layer: int = 0) -> int:
    """Bytes of the tensors distilling MoE layer `layer` reads: embeddings + decoder layers 0..layer."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    total = 0
    for file in set(index["weight_map"].values()):
        with open(path / file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n))
        for name, m in meta.items():
            if name == "__metadata__":
                continue
            parts = name.split(".")
            needed = "embed_tokens" in name or (parts[1] == "layers" and int(parts[2]) <= layer)
            if needed:
                total += m["data_offsets"][1] - m["data_offsets"][0]
    return total
