"""transformers' own expert parallelism (DistributedConfig(ep_size=2)) with an attached Grouter, on
2 gloo ranks: each rank's logits equal the single-process attached model's on its half of the
batch. transformers needs `accelerate` for its distributed loading: skipped without it."""

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "hf")]

pytest.importorskip("accelerate", reason="transformers' distributed loading (DistributedConfig) needs accelerate")

from launch import run_ranks  # noqa: E402


def test_transformers_expert_parallelism_routes_by_an_attached_grouter(tmp_path):
    import grouter.hf
    from hf_models import small_grouter, tiny

    torch.manual_seed(0)
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    run_ranks(2, [str(HERE / "hf_ep_worker.py"), str(tmp_path / "model"), str(tmp_path)])
    torch.manual_seed(0)
    grouter.hf.attach(model, small_grouter())  # the Grouter routes to all 8 experts, each rank hosts 4
    ids = torch.randint(3, 101, (4, 9), generator=torch.Generator().manual_seed(1))
    for rank in range(2):
        r = torch.load(tmp_path / f"hf_ep.{rank}.pt")
        assert r["local"] == 4
        mine = ids[2 * rank:2 * rank + 2]
        torch.testing.assert_close(r["logits"], model(input_ids=mine).logits.detach(), rtol=0, atol=1e-6)
        # transformers' dispatch runs its own grouped_mm on the local experts; grouter's routes feed it
        assert any("transformers' grouped_mm" in w for w in r["warnings"]), r["warnings"]
