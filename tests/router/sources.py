"""Tiny transformers MoE sources of several router kinds (softmax; sigmoid + correction bias +
group limits), with routing that varies from token to token."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter.hf  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256)


def family_model(family, bias_std=0.0, n_group=1, topk_group=1, layers=2, seed=0):
    """A `family` model ("qwen3_moe", "deepseek_v2", "deepseek_v3", "glm4_moe") with gates of std 0.5 and a
    correction bias of std `bias_std` (sigmoid families), in eval mode."""
    torch.manual_seed(seed)
    common = dict(COMMON, num_hidden_layers=layers)
    if family == "deepseek_v3":
        config = transformers.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, n_routed_experts=8,
                                               moe_intermediate_size=16, n_group=n_group, topk_group=topk_group,
                                               first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16,
                                               q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        model = transformers.DeepseekV3ForCausalLM(config)
    elif family == "deepseek_v2":
        config = transformers.DeepseekV2Config(**{**common, "num_key_value_heads": 4}, n_routed_experts=8,
                                               moe_intermediate_size=16, n_group=n_group, topk_group=topk_group,
                                               topk_method="group_limited_greedy" if n_group > 1 else "greedy",
                                               first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16,
                                               q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
        model = transformers.DeepseekV2ForCausalLM(config)
    elif family == "glm4_moe":
        config = transformers.Glm4MoeConfig(**common, n_routed_experts=8, moe_intermediate_size=16, n_group=n_group,
                                            topk_group=topk_group, first_k_dense_replace=0, n_shared_experts=1)
        model = transformers.Glm4MoeForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(**common, num_experts=8, moe_intermediate_size=16)
        model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for _, block, attr in grouter.nn.moe_blocks(model):
            gate = getattr(block, attr)
            gate.weight.normal_(std=0.5)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(std=bias_std)
    return model.float().eval()


def chosen_by_the_gate(model, tokens, layer=0):
    """The expert ids the gate of MoE layer `layer` returns in a plain forward of the whole model."""
    _, block, attr = grouter.nn.moe_blocks(model)[layer]
    seen = []
    handle = getattr(block, attr).register_forward_hook(lambda m, a, out: seen.append(out[2]))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])
