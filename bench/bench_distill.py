"""Distillation from a deep sharded source vs a shallow one: only the needed layers may cost;
and from a real-size source.

    python bench/bench_distill.py [--steps 40] [--layers 24] [--hidden 256]
    python bench/bench_distill.py --shape olmoe-1b-7b [--tokens 1000000] [--steps 300]
    python bench/bench_distill.py --shape qwen3-30b-a3b   (layers above the first as sparse zeros)

--shape: a checkpoint of that model's published shape with random bf16 weights, written shard by
shard into bench/.distill_sources/ (reused), distilled by `grouter distill` on --tokens random
token ids (seq 128) in a fresh process; peak RSS (VmHWM) and seconds against the bytes of the
embeddings + the loaded layers. Target (issue 21): peak RSS <= 1.5x those bytes + 1 GiB.

Writes two Qwen3-MoE checkpoints of the same width (sharded safetensors, in bench/.distill_sources/,
reused): --layers decoder layers (the "deep" source) and 2. Each is distilled by the CLI,
`grouter distill --source DIR --data tokens.npy --steps N`, in a fresh process that reports its
own peak RSS and wall time. Targets (issue 12): deep peak <= shallow peak + 25% of the deep
checkpoint's size on disk; deep time <= 1.5x shallow.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Peak memory from VmHWM: ru_maxrss survives exec on Linux, so it would carry this process's peak.
RUN = ("import json, re, sys, time; from grouter.cli import main; t = time.perf_counter(); "
       "rc = main(sys.argv[1:]); hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()); "
       "print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - t, peak_mib=int(hwm.group(1)) / 1024)))")


def make_source(path: Path, layers: int, hidden: int) -> None:
    import transformers

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2,
        moe_intermediate_size=hidden, max_position_embeddings=512)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    model.save_pretrained(path, max_shard_size="20MB")


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def distill(source: Path, data: Path, out: Path, steps: int) -> dict:
    args = ["--source", str(source), "--data", str(data), "--out", str(out), "--steps", str(steps)]
    r = subprocess.run([sys.executable, "-c", RUN, "distill", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    result["heldout"] = json.loads((out / "report.json").read_text())["heldout"]
    return result


def real_size(args) -> None:
    import shutil

    from real_source import SHAPES, loaded_bytes, make_real_source

    root = HERE / ".distill_sources"
    src = root / args.shape
    sparse = args.shape == "qwen3-30b-a3b"
    print(f"source {args.shape}: writing or reusing {src}", flush=True)
    make_real_source(src, args.shape, dense_layers=1, sparse_rest=sparse)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    data = root / f"tokens_{args.tokens}_{vocab}.npy"
    if not data.is_file():
        np.save(data, np.random.default_rng(0).integers(0, vocab, args.tokens).astype(np.int32))
    out = root / f"out_{args.shape}"
    shutil.rmtree(out, ignore_errors=True)
    r = distill(src, data, out, args.steps)
    timings = json.loads((out / "timings.json").read_text())
    report = json.loads((out / "report.json").read_text())
    need = loaded_bytes(src, 0) / 2**20
    on_disk = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 2**30
    teacher_tokens = (report["train_samples"] + report["heldout"]["samples"]) * 128
    target = 1.5 * need + 1024
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tokens:,} tokens (seq 128), "
          f"--steps {args.steps}; checkpoint {on_disk:.1f} GiB on disk{' (layers > 0 sparse zeros)' if sparse else ''}")
    print(f"embeddings + MoE layer 0: {need:,.0f} MiB; peak RSS {r['peak_mib']:,.0f} MiB (target <= 1.5x + 1 GiB = "
          f"{target:,.0f} MiB: {'met' if r['peak_mib'] <= target else 'MISSED'}); wall {r['seconds']:.0f} s: load "
          f"{timings['load_source']:.1f} s, teacher {timings['teacher']:.1f} s ({teacher_tokens / timings['teacher']:,.0f} "
          f"tokens/s), distill {timings['distill']:.1f} s")
    h = report["heldout"]
    print(f"rule {report['source']['rule']}; held-out KL {h['kl_before']:.3f} -> {h['kl_after']:.3f}, top-"
          f"{h['k']} agreement {h['topk_agreement_before']:.3f} -> {h['topk_agreement']:.3f} (random weights)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: 40; 300 with --shape)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="runs of each (alternating); the best time is kept")
    p.add_argument("--shape", default=None, choices=["olmoe-1b-7b", "qwen3-30b-a3b"], help="a real-size source")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens distilled with --shape")
    args = p.parse_args()
    if args.shape:
        args.steps = 300 if args.steps is None else args.steps
        real_size(args)
        return
    args.steps = 40 if args.steps is None else args.steps
    root = HERE / ".distill_sources"
    deep, shallow = root / f"qwen3_moe_{args.layers}l_{args.hidden}", root / f"qwen3_moe_2l_{args.hidden}"
    make_source(deep, args.layers, args.hidden)
    make_source(shallow, 2, args.hidden)
    data = root / "tokens.npy"
    np.save(data, np.random.default_rng(0).integers(0, 2048, 40_000))
    runs = {"deep": [], "shallow": []}
    for rep in range(args.reps):
        for name, src in (("shallow", shallow), ("deep", deep)):
            out = root / f"out_{name}"
            if out.exists():
                import shutil

                shutil.rmtree(out)  # no resumed teacher pass: every run computes it
            runs[name].append(distill(src, data, out, args.steps))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    peak = {k: max(r["peak_mib"] for r in v) for k, v in runs.items()}
    size = disk_mib(deep)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; --steps {args.steps}, 40k tokens (seq 128), "
          f"best of {args.reps}")
    print(f"{'source':<28}{'on disk MiB':>12}{'seconds':>9}{'peak MiB':>10}{'held-out KL':>13}{'top-k agree':>12}")
    for name, src in (("shallow", shallow), ("deep", deep)):
        r = best[name]
        h = r["heldout"]
        print(f"{src.name:<28}{disk_mib(src):>12.0f}{r['seconds']:>9.2f}{peak[name]:>10.0f}"
              f"{h['kl_before']:>6.3f}->{h['kl_after']:.3f}{h['topk_agreement']:>10.3f}")
    extra = peak["deep"] - peak["shallow"]
    ratio = best["deep"]["seconds"] / best["shallow"]["seconds"]
    print(f"deep - shallow peak: {extra:+.0f} MiB (target <= 25% of {size:.0f} MiB = {0.25 * size:.0f} MiB); "
          f"time ratio {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
