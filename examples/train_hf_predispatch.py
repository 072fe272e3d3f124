"""Train a transformers MoE language model on pre-dispatched Grouter routes, save it, generate.

    python examples/train_hf_predispatch.py [--grouter DIR] [--steps 60]

Bytes of Python's own documentation (`pydoc_data.topics`) are cut into windows; a Grouter (a saved
byte-level one with --grouter, else a fresh one) routes them once, offline, into a
pre-dispatch folder. A small Qwen3-MoE is attached to the Grouter and trained from the stored
routes (`grouter.hf.set_routes` before each step: no Grouter work in the training loop), saved
with its Grouter, loaded back and asked to continue a prompt with the KV cache.
"""

import argparse
import time
from pathlib import Path

import torch
import transformers
from pydoc_data.topics import topics

import grouter
import grouter.hf


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grouter", type=Path, help="a saved Grouter over bytes (default: a fresh one, 8 experts top-2)")
    p.add_argument("--out", type=Path, default=Path("hf_predispatch_run"), help="output folder")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--seq", type=int, default=128, help="bytes per window")
    p.add_argument("--hidden", type=int, default=64, help="model width")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    g = grouter.Grouter.load(args.grouter) if args.grouter else grouter.Grouter(256, 8, 2, d_model=64, n_layers=2,
                                                                                 n_heads=4)
    if g.vocab_size != 256:  # the demo's Grouters read BPE tokens, this example bytes
        raise SystemExit(f"--grouter: this example routes bytes; {args.grouter} reads {g.vocab_size} token ids")
    text = "".join(topics[k] for k in sorted(topics)).encode()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    # Held out: the last 16 windows of the text, never trained on; the loss is reported on them.
    held = tokens[-16 * args.seq:].view(16, args.seq)
    routes = args.out / "routes"
    grouter.predispatch(g, tokens[: min(args.steps * args.batch * args.seq, tokens.numel() - held.numel())], routes,
                        seq_len=args.seq, progress=False)
    reader = grouter.PredispatchReader(routes, grouter=g)

    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=g.num_experts, num_experts_per_tok=g.top_k,
        moe_intermediate_size=args.hidden, max_position_embeddings=4 * args.seq, pad_token_id=0, use_cache=False)
    model = grouter.hf.attach(transformers.Qwen3MoeForCausalLM(config), g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = heldout_loss(model, held)  # routed by the attached Grouter, on the fly
    losses, start = [], time.perf_counter()
    for step in range(min(args.steps, len(reader) // args.batch)):
        batch = [reader[i] for i in range(step * args.batch, (step + 1) * args.batch)]
        x, ids, weights = (torch.stack(t) for t in zip(*batch))
        grouter.hf.set_routes(model, ids, weights)  # pre-dispatched: this forward takes them
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    took = time.perf_counter() - start
    after = heldout_loss(model, held)
    print(f"trained {len(losses)} steps in {took:.1f} s; held-out loss {before:.3f} -> {after:.3f} nats/byte")

    grouter.hf.save_pretrained(model, args.out / "model")
    model = grouter.hf.from_pretrained(args.out / "model").eval()
    print(f"reloaded: held-out loss {heldout_loss(model, held):.3f}")
    prompt = torch.tensor([list(b"def ")])
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False, use_cache=True)
    print("generated:", repr(bytes(out[0].tolist())))
    return before, after


@torch.no_grad()
def heldout_loss(model, windows) -> float:
    return model(input_ids=windows, labels=windows).loss.item()


if __name__ == "__main__":
    main()
