"""A converted torchtitan model under FSDP2 (gloo, 2 ranks), built on the meta device and resumed
from a one-process DCP checkpoint, trains as one process does; with bf16 mixed precision, close to it."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import build, one_process_training, small_grouter, tokens  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from launch import run_ranks  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "fsdp_worker.py")
WORLD, STEPS, GLOBAL_BATCH = 2, 3, 4


def test_fsdp2_meta_init_and_mixed_precision(tmp_path):
    samples = tokens(batch=STEPS * GLOBAL_BATCH, length=17, seed=11)
    grouter.predispatch(small_grouter(), samples, tmp_path / "routes")
    model = gt.convert(build(seed=4), None)
    dcp.save({"model": ModelWrapper(model)}, checkpoint_id=str(tmp_path / "ckpt"))
    ref_losses = one_process_training(model, tmp_path / "routes", WORLD, GLOBAL_BATCH, STEPS)
    per_rank = GLOBAL_BATCH // WORLD
    for mode in ("fp32", "bf16"):
        run_ranks(WORLD, [WORKER, str(tmp_path / "routes"), str(tmp_path / "ckpt"), str(tmp_path), mode,
                          str(STEPS), str(per_rank)], timeout=300)
    trained = {}
    for mode in ("fp32", "bf16"):  # the ranks' sharded checkpoint, loaded back into one process
        trained[mode] = gt.convert(build(seed=5), None)
        dcp.load({"model": ModelWrapper(trained[mode])}, checkpoint_id=str(tmp_path / f"trained.{mode}"))
    fp32 = torch.load(tmp_path / "fsdp.fp32.pt")
    torch.testing.assert_close(torch.stack(fp32["losses"]), torch.stack(ref_losses), rtol=1e-5, atol=1e-6)
    ref_params = dict(model.named_parameters())
    for name, p in trained["fp32"].named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-6, msg=name)
    bf16 = torch.load(tmp_path / "fsdp.bf16.pt")
    torch.testing.assert_close(torch.stack(bf16["losses"]), torch.stack(ref_losses), rtol=3e-2, atol=3e-2)
    assert all(torch.isfinite(p).all() for p in trained["bf16"].parameters())
