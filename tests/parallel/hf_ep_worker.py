"""One rank of the transformers expert-parallel test: `python hf_ep_worker.py MODEL_DIR OUT_DIR`.

Loads a saved tiny Qwen3-MoE with transformers' own expert parallelism (DistributedConfig(ep_size=2,
fsdp_size=2): experts sharded over the ranks, dispatched by transformers' all-to-all), attaches a
Grouter, runs one forward and backward on this rank's half of the batch, and saves the logits and
the full expert gradients.
"""

import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "hf")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

import grouter.hf  # noqa: E402
from hf_models import small_grouter  # noqa: E402


def main(model_dir: str, out_dir: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2), dtype=torch.float32)
    torch.manual_seed(0)
    grouter.hf.attach(model, small_grouter())
    ids = torch.randint(3, 101, (4, 9), generator=torch.Generator().manual_seed(1))[2 * rank:2 * rank + 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    experts = model.model.layers[0].mlp.experts
    torch.save(dict(logits=out.logits.detach(), loss=out.loss.detach(), warnings=[str(w.message) for w in caught],
                    local=experts.num_experts),
               Path(out_dir) / f"hf_ep.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
