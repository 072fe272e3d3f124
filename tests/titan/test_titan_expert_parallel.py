"""torchtitan's expert parallelism on gloo (2 and 4 ranks) with routes known ahead: the same losses
and parameters as one process, and what each step sends and waits for, with and without."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

import torch  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import build, one_process_training, small_grouter, tokens  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from launch import run_ranks  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "ep_worker.py")
STEPS, GLOBAL_BATCH, LAYERS = 3, 4, 2


@pytest.fixture(scope="module")
def routes(tmp_path_factory):
    path = tmp_path_factory.mktemp("titan_ep") / "routes"
    samples = tokens(batch=STEPS * GLOBAL_BATCH, length=17, seed=9)
    grouter.predispatch(small_grouter(), samples, path)
    return path


@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_training_equals_one_process_with_splits_known_ahead(routes, tmp_path, world):
    path = routes
    model = gt.convert(build(), None)
    ref_losses = one_process_training(model, path, world, GLOBAL_BATCH, STEPS)
    ref_params = dict(model.named_parameters())
    results = {}
    for mode in ("known", "exchange", "stock"):
        run_ranks(world, [WORKER, str(path), str(tmp_path), mode, str(STEPS), str(GLOBAL_BATCH // world)], timeout=300)
        results[mode] = [torch.load(tmp_path / f"ep.{mode}.{r}.pt") for r in range(world)]
    for mode, ranks in results.items():
        torch.testing.assert_close(torch.stack(ranks[0]["losses"]), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
        for name, p in ref_params.items():
            got = ranks[0]["params"][name]
            if "inner_experts" in name:  # shards, in rank order
                got = torch.cat([r["params"][name] for r in ranks])
            torch.testing.assert_close(got, p.detach(), rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")
    # What each step cost on each rank (forward + backward of LAYERS MoE layers).
    for mode, ranks in results.items():
        for r in ranks:
            for step in r["per_step"]:
                ops = step["ops"]
                token_a2a = 4 * LAYERS  # dispatch + combine, forward and backward
                if mode == "stock":  # + one count all-to-all and one host sync per layer
                    assert ops.get("all_to_all_single", 0) == token_a2a + LAYERS and step["host_syncs"] == LAYERS
                elif mode == "exchange":  # + one all-gather of counts per step
                    assert ops.get("all_to_all_single", 0) == token_a2a and step["host_syncs"] == 1
                    assert ops.get("allgather_into_tensor_coalesced", 0) + ops.get("_allgather_base_", 0) == 1
                else:  # splits known before the step: no count collective, no sync
                    assert ops.get("all_to_all_single", 0) == token_a2a and step["host_syncs"] == 0
                    assert not any("allgather" in op for op in ops)


def test_expert_parallel_refuses_what_it_cannot_shard_or_dispatch():
    class Mesh:  # a 1-D mesh of 2 ranks, as far as the checks before any collective look
        ndim = 1

        def size(self):
            return 2

    with pytest.raises(RuntimeError, match="not converted"):
        gt.expert_parallel(build(), Mesh())
    with pytest.raises(ValueError, match="do not divide"):
        gt.expert_parallel(gt.convert(build(), None), type("M3", (Mesh,), {"size": lambda s: 3})())  # 8 experts
    from torchtitan.distributed.utils import get_spmd_backend
    assert get_spmd_backend() == "spmd_types"  # torchtitan's default, which needs its trainer's mesh
    with pytest.raises(RuntimeError, match="partial_dtensor"):
        gt.expert_parallel(gt.convert(build(), None), Mesh())
