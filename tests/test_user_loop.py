"""The loop a user lives in, as a user writes it: a sharded transformers MoE checkpoint -> `grouter
distill` -> `grouter fold` -> `grouter tune` -> a new model trained with the Grouter attached ->
saved -> loaded -> generating a padded batch with the KV cache. Quality figures are held out."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
import grouter.hf  # noqa: E402
from grouter.cli import main  # noqa: E402


def qwen3_moe(experts, layers, **extra):
    return transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=256, pad_token_id=0, **extra)


def test_distill_fold_tune_train_save_load_generate(tmp_path):
    from pydoc_data.topics import topics

    text = np.frombuffer("".join(topics[k] for k in sorted(topics)).encode(), dtype=np.uint8)
    text[:60_000].tofile(tmp_path / "source_data.bin")  # what the source's router is distilled on
    text[60_000:120_000].tofile(tmp_path / "target_data.bin")  # the new model's data
    held = torch.from_numpy(text[-16 * 64:].astype(np.int64)).view(16, 64)  # never trained on

    # A "trained" source MoE checkpoint, sharded as transformers writes large models.
    torch.manual_seed(0)
    source = transformers.Qwen3MoeForCausalLM(qwen3_moe(8, 4))
    with torch.no_grad():
        for name, p in source.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    source.save_pretrained(tmp_path / "source", max_shard_size="100KB")

    def cli(*args):
        assert main([str(a) for a in args]) == 0

    src = ["--dtype", "uint8", "--seq-len", "64"]
    cli("distill", "--source", tmp_path / "source", "--data", tmp_path / "source_data.bin", *src, "--steps", 80,
        "--out", tmp_path / "g")
    tgt = ["--data", tmp_path / "target_data.bin", *src]
    cli("fold", "--grouter", tmp_path / "g", *tgt, "--experts", 4, "--out", tmp_path / "g4")
    cli("tune", "--grouter", tmp_path / "g4", *tgt, "--out", tmp_path / "g4t")
    distilled = json.loads((tmp_path / "g" / "report.json").read_text())["heldout"]
    tuned = json.loads((tmp_path / "g4t" / "report.json").read_text())["heldout"]
    assert distilled["kl_after"] < distilled["kl_before"] and distilled["topk_agreement"] > distilled["topk_agreement_before"]
    assert tuned["max_vio_after"] <= tuned["max_vio_before"]

    # A new model with 4 experts, routed by the folded, tuned Grouter.
    model = grouter.hf.attach(transformers.Qwen3MoeForCausalLM(qwen3_moe(4, 2)), grouter.Grouter.load(tmp_path / "g4t"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(np.fromfile(tmp_path / "target_data.bin", dtype=np.uint8).astype(np.int64))
    windows = data[: 40 * 8 * 64].view(40, 8, 64)
    with torch.no_grad():
        before = model(input_ids=held, labels=held).loss.item()
    for x in windows:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=held, labels=held).loss.item()
    assert after < before - 0.5, (before, after)

    model.save_pretrained(tmp_path / "trained")  # the model's own save keeps its Grouter
    loaded = grouter.hf.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        assert loaded(input_ids=held, labels=held).loss.item() == pytest.approx(after, abs=1e-6)

    prompts = [list(b"def main("), list(b"class ")]
    batch = torch.tensor([[0] * 3 + prompts[1], prompts[0]])  # left-padded
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.inference_mode():
        out = loaded.generate(batch, attention_mask=mask, **kw)
        for row, prompt, pad in ((0, prompts[1], 3), (1, prompts[0], 0)):
            alone = loaded.generate(torch.tensor([prompt]), **kw)
            assert torch.equal(out[row, pad:], alone[0])
