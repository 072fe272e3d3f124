"""Distillation from a deep sharded source vs a shallow one: only the needed layers may cost.

    python bench/bench_distill.py [--steps 40] [--layers 24] [--hidden 256]

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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="runs of each (alternating); the best time is kept")
    args = p.parse_args()
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
