"""Generation with an attached Grouter: cached == uncached, padded == alone, beams, manual decoding."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import grouter.hf  # noqa: E402
from hf_models import VOCAB, small_grouter, tiny  # noqa: E402

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe"]


def attached(name):
    model = tiny(name).eval()
    grouter.hf.attach(model, small_grouter())
    return model


def greedy(model, ids, **kw):
    out = model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, output_logits=True, return_dict_in_generate=True,
                         **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_uncached(name):
    model = attached(name)
    ids = torch.randint(3, VOCAB, (1, 11))
    with torch.inference_mode():
        cached, cached_logits = greedy(model, ids, use_cache=True)
        full, full_logits = greedy(model, ids, use_cache=False)
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_logits, full_logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_each_prompt_as_alone(name, use_cache):
    model = attached(name)
    prompts = [torch.randint(3, VOCAB, (n,)) for n in (4, 13, 9)]
    S = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, S - len(p):], mask[i, S - len(p):] = p, 1
    with torch.inference_mode():
        together, logits = greedy(model, batch, attention_mask=mask, use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone, alone_logits = greedy(model, p[None], use_cache=use_cache)
            assert torch.equal(together[i, S - len(p):], alone[0])
            torch.testing.assert_close(logits[i], alone_logits[0], rtol=0, atol=1e-4)


def test_decode_steps_take_the_routes_of_the_whole_prefix():
    model = attached("qwen3_moe")
    g = grouter.hf.attachment_of(model).grouter
    seen = []
    block = grouter.nn.moe_blocks(model)[0][1]
    hook = block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=9, min_new_tokens=9)
    hook.remove()
    want = g.route(out[:, :-1])[0]  # the last token is generated, never fed back
    got = torch.cat([s.view(2, -1, 2) for s in seen], 1)
    assert len(seen) == 9 and torch.equal(got, want)


def test_beam_search_cached_equals_uncached():
    model = attached("qwen3_moe")
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.inference_mode():
        kw = dict(do_sample=False, max_new_tokens=8, num_beams=3, num_return_sequences=2)
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_manual_decoding_loop_with_returned_cache():
    model = attached("olmoe")
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)  # the model makes its cache; the Grouter's joins it
        steps = [out.logits]
        for t in range(6, 10):
            out = model(ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_caches_the_grouter_did_not_fill_raise():
    model = tiny("qwen3_moe").eval()
    ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache  # filled by the learned gates
        grouter.hf.attach(model, small_grouter())
        with pytest.raises(RuntimeError, match="did not route"):
            model(ids[:, :1], cache=cache)
        cache.crop(-1)  # the model's crop is followed by the Grouter's cache
        out = model(ids, use_cache=True)
        out.cache.crop(-3)
        model(ids[:, 5:6], cache=out.cache)
        out.cache.layers[0].keys = out.cache.layers[0].keys[..., :-1, :]  # changed behind grouter's back
        with pytest.raises(RuntimeError, match="routing cache"):
            model(ids[:, 6:7], cache=out.cache)


def test_bidirectional_grouter_refuses_cached_generation():
    model = tiny("qwen3_moe").eval()
    grouter.hf.attach(model, small_grouter(causal=False))
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.inference_mode():
        model.generate(ids, do_sample=False, max_new_tokens=3, use_cache=False)
        with pytest.raises(ValueError, match="bidirectional"):
            model.generate(ids, do_sample=False, max_new_tokens=3, use_cache=True)


MORE = {  # families beyond the four above, each as small as it builds
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        num_key_value_heads=4, n_routed_experts=8, moe_intermediate_size=16, first_k_dense_replace=0, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=8, head_dim=8)),  # biased experts
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(n_routed_experts=8, moe_intermediate_size=16,
                                                             first_k_dense_replace=0, n_group=1, topk_group=1)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(num_local_experts=8)),
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_families_cached_padded_and_alone_agree(name):
    import warnings

    from hf_models import COMMON

    config_cls, model_cls, extra = MORE[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(
        **{**COMMON, "num_hidden_layers": 2, **extra})).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt_oss: biased experts fall back to grouped_mm, with a warning
        grouter.hf.attach(model, small_grouter())
        ids = torch.randint(3, VOCAB, (2, 7))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        with torch.inference_mode():
            kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)
            cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
            assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **kw))
            assert torch.equal(cached[0, 3:], model.generate(ids[:1, 3:], use_cache=True, **kw)[0])
