"""A partial source: only the layers up to the distilled MoE layer are loaded and run."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter  # noqa: E402
from grouter.hf.source import load_source  # noqa: E402
from grouter.router.capture import SourceCapture  # noqa: E402

VOCAB = 97


def save_qwen3(path, layers=6, **extra):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                         num_experts_per_tok=2, moe_intermediate_size=16, **extra)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    model.save_pretrained(path, max_shard_size="100KB")  # sharded
    return model.eval()


@pytest.mark.parametrize("layer", [0, 2])
def test_partial_source_gives_the_full_models_router_logits(tmp_path, layer):
    full = save_qwen3(tmp_path, mlp_only_layers=[1])  # decoder layer 1 is dense: MoE layer 2 = decoder layer 3
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    part, info = load_source(tmp_path, layer)
    assert info["decoder_layers_kept"] == (1 if layer == 0 else 4) and info["decoder_layers_total"] == 6
    assert len(part.layers) == info["decoder_layers_kept"] and not hasattr(part, "lm_head")
    ids = torch.randint(0, VOCAB, (2, 11))
    with SourceCapture(full, layer) as cap:
        want = cap.run(ids)
    with SourceCapture(part, layer) as cap:
        got = cap.run(ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_partial_source_keeps_the_stored_dtype_or_casts(tmp_path):
    save_qwen3(tmp_path, layers=2)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).to(torch.bfloat16)
    m.save_pretrained(tmp_path / "bf16")
    assert next(load_source(tmp_path / "bf16")[0].parameters()).dtype == torch.bfloat16
    assert next(load_source(tmp_path / "bf16", dtype=torch.float32)[0].parameters()).dtype == torch.float32


def test_source_errors(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        load_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_source(tmp_path / "empty")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no MoE blocks"):
        load_source(tmp_path / "dense")
    save_qwen3(tmp_path / "moe", layers=2)
    with pytest.raises(ValueError, match="--layer 5"):
        load_source(tmp_path / "moe", layer=5)


def test_the_source_stops_after_the_distilled_router(tmp_path):
    save_qwen3(tmp_path, layers=3)
    part, _ = load_source(tmp_path, 1)
    ran = []
    part.layers[1].mlp.experts.register_forward_hook(lambda *a: ran.append(1))
    with SourceCapture(part, 1) as cap:
        cap.run(torch.randint(0, VOCAB, (1, 5)))
    assert ran == []  # the distilled layer's experts never ran
    assert grouter.router.TeacherLogits  # exported


FAMILIES = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, intermediate_size=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, intermediate_size=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(num_experts=8, intermediate_size=16,
                                                                   moe_intermediate_size=16,
                                                                   shared_expert_intermediate_size=24)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_partial_source_of_other_families(tmp_path, family):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                               num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                                               **extra)
    torch.manual_seed(0)
    full = getattr(transformers, model_cls)(config).eval()
    full.save_pretrained(tmp_path, max_shard_size="100KB")
    part, info = load_source(tmp_path, 1)
    assert info["decoder_layers_kept"] == 2 and info["num_experts"] == 8
    ids = torch.randint(0, VOCAB, (2, 9))
    with SourceCapture(full, 1) as cap:
        want = cap.run(ids)
    with SourceCapture(part, 1) as cap:
        got = cap.run(ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
