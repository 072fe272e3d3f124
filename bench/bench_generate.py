"""Cached generation with an attached Grouter vs the same model routed by its learned gates.

    python bench/bench_generate.py [--prompt 1024] [--new 64] [--reps 5] [--batch 1]

A Qwen3-MoE (H=512, 8 layers, 16 experts top-2, vocab 4096, fp32) generates --new tokens greedily
after a --prompt-token prompt with the KV cache. Configurations, on the same weights, timed
interleaved (medians of --reps):
  learned   the model's own gates, "grouter" experts implementation
  eager     the model's own gates, transformers' eager experts (reference)
  grouter   a Grouter attached (d_model 128, 2 layers: small next to the model, as in real use);
            each new token is routed from its whole prefix by the Grouter's own KV cache
  recompute what cached generation would cost if the Grouter re-read the prefix at every step
            (it routes the whole sequence each step; measured once, for scale)
Target (issue 11): grouter <= 1.3x learned.
"""

import argparse
import statistics
import time

import torch
import transformers

import grouter
import grouter.hf


def build(args):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
        max_position_embeddings=args.prompt + args.new + 8, pad_token_id=0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for _, block, attr in grouter.nn.moe_blocks(model):
            getattr(block, attr).weight.normal_(std=0.5)
    g = grouter.Grouter(4096, 16, 2, d_model=128, n_layers=2, n_heads=4)
    return model, g


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    model, g = build(args)
    prompt = torch.randint(1, 4096, (args.batch, args.prompt))
    kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, use_cache=True)

    def run(mode):
        grouter.hf.detach(model)
        if mode == "grouter":
            grouter.hf.attach(model, g)
        else:
            model.set_experts_implementation("eager" if mode == "eager" else "grouter")
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(prompt, **kw)
            took = time.perf_counter() - start
        return took, out

    modes = ["learned", "eager", "grouter"]
    for mode in modes:
        run(mode)  # warm-up
    times = {m: [] for m in modes}
    for _ in range(args.reps):
        for mode in modes:
            times[mode].append(run(mode)[0])
    med = {m: statistics.median(t) for m, t in times.items()}

    # For scale: routing the whole sequence at every step (what a Grouter without a cache costs).
    seq = run("grouter")[1]
    with torch.inference_mode():
        start = time.perf_counter()
        for t in range(args.prompt, args.prompt + args.new):
            g.route(seq[:, :t])
        recompute_routing = time.perf_counter() - start
        start = time.perf_counter()
        from grouter import GrouterCache

        cache = GrouterCache()
        g.route(seq[:, :args.prompt], cache=cache)
        for t in range(args.prompt, args.prompt + args.new - 1):
            g.route(seq[:, t:t + 1], cache=cache)
        cached_routing = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    g_params = sum(p.numel() for p in g.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {n_params / 1e6:.1f}M params, "
          f"Grouter {g_params / 1e6:.2f}M; batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"medians of {args.reps}")
    print(f"{'configuration':<34}{'seconds':>9}{'tokens/s':>10}{'vs learned':>12}")
    for mode, label in [("eager", "learned gates, eager experts"), ("learned", "learned gates, grouter experts"),
                        ("grouter", "Grouter attached (cached routes)")]:
        print(f"{label:<34}{med[mode]:>9.3f}{args.batch * args.new / med[mode]:>10.1f}"
              f"{med[mode] / med['learned']:>11.2f}x")
    print(f"Grouter routing alone: prefill + {args.new - 1} cached steps {cached_routing:.3f} s; "
          f"re-reading the prefix every step {recompute_routing:.3f} s ({recompute_routing / cached_routing:.1f}x)")


if __name__ == "__main__":
    main()
