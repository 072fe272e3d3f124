"""Small torchtitan model configs that train on a CPU: Qwen3-MoE and DeepSeek-V3 as torchtitan
builds them (its own layer builders), with dimensions of your choosing.

Language models in torchtitan attend with FlexAttention or varlen; neither runs backward on a CPU,
so these use torchtitan's causal ScaledDotProductAttention instead (call the model without
attention masks). Everything else - norms, RoPE, MoE, routers, dispatchers, experts - is torchtitan's.
"""

from __future__ import annotations

from torchtitan.models.common import CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.common.rope import ComplexRoPE

__all__ = ["qwen3_moe_config", "deepseek_v3_config"]


def _sdpa(layers):
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return layers


def qwen3_moe_config(*, vocab_size: int = 256, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                     head_dim: int = 16, moe_hidden_dim: int = 32, num_experts: int = 8, top_k: int = 2,
                     max_seq_len: int = 512):
    """A torchtitan Qwen3-MoE config (softmax router with route_norm, as Qwen3's)."""
    import torchtitan.models.qwen3 as q

    layers = q._build_qwen3_moe_layers(
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        moe_hidden_dim=moe_hidden_dim, num_experts=num_experts, top_k=top_k, attn_backend="flex",
        moe_comm_backend="standard", rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=1e6))
    return q.Qwen3Model.Config(
        vocab_size=vocab_size, dim=dim, norm=q._qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=q._LINEAR_INIT),
        layers=_sdpa(layers))


def deepseek_v3_config(*, vocab_size: int = 256, dim: int = 64, n_layers: int = 3, n_dense_layers: int = 1,
                       n_heads: int = 4, moe_hidden_dim: int = 32, num_experts: int = 8, top_k: int = 2,
                       num_shared_experts: int = 1, num_expert_groups: int | None = 4,
                       num_limited_groups: int | None = 2, max_seq_len: int = 512):
    """A torchtitan DeepSeek-V3 config: MLA attention, dense first layers, shared experts, sigmoid
    router with group-limited routing and an expert bias, as DeepSeek-V3's."""
    import torchtitan.models.deepseek_v3 as d
    from torchtitan.models.common.nn_modules import RMSNorm

    rope_dim = 8
    layers = d._build_dsv3_layers(
        n_layers=n_layers, n_dense_layers=n_dense_layers, dim=dim, n_heads=n_heads, q_lora_rank=0,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=rope_dim, v_head_dim=16, mscale=0.70,
        dense_hidden_dim=4 * dim, moe_hidden_dim=moe_hidden_dim, num_experts=num_experts,
        num_shared_experts=num_shared_experts, router_top_k=top_k, router_score_func="sigmoid",
        router_num_expert_groups=num_expert_groups, router_num_limited_groups=num_limited_groups,
        router_route_norm=True, attn_backend="flex", moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=rope_dim, max_seq_len=max_seq_len, theta=10000.0))
    return d.DeepSeekV3Model.Config(
        vocab_size=vocab_size, dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=d._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=d._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=d._output_linear_init(dim)),
        layers=_sdpa(layers), mtp_layers=[])
