"""A converted model saves and resumes through DCP exactly: torchtitan's ModelWrapper for the model,
the optimizer through torch.distributed.checkpoint's state_dict helpers."""

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torchtitan.components.checkpointer.base import ModelWrapper  # noqa: E402

import grouter.titan as gt  # noqa: E402
from titan_models import build, lm_loss, small_grouter, tokens  # noqa: E402


class OptimizerState(Stateful):
    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.opt)

    def load_state_dict(self, state):
        set_optimizer_state_dict(self.model, self.opt, state)


def _step(model, opt, step):
    x = tokens(seed=100 + step, length=17)
    loss = lm_loss(model(x[:, :-1]), x[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_dcp_save_and_resume_is_exact(tmp_path, family):
    g = small_grouter()
    model = gt.convert(build(family), g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        _step(model, opt, step)
    dcp.save({"model": ModelWrapper(model), "optimizer": OptimizerState(model, opt)}, checkpoint_id=str(tmp_path))
    keys = {k for k in ModelWrapper(model).state_dict()}
    assert not any("router" in k or "expert_bias" in k for k in keys)  # nothing of the fixed router is saved
    continued = [_step(model, opt, step) for step in (2, 3)]

    resumed = gt.convert(build(family, seed=7), g)  # other initial weights: all must come from the checkpoint
    ropt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    dcp.load({"model": ModelWrapper(resumed), "optimizer": OptimizerState(resumed, ropt)}, checkpoint_id=str(tmp_path))
    again = [_step(resumed, ropt, step) for step in (2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(continued, again))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_a_torchtitan_checkpoint_of_the_unconverted_model_loads_into_the_converted_one(tmp_path):
    # Converting keeps every parameter name but the gates': resume a torchtitan run onto a Grouter
    # (the gates' entries are left in the checkpoint, unread).
    model = build()
    dcp.save({"model": ModelWrapper(model)}, checkpoint_id=str(tmp_path))
    converted = gt.convert(build(seed=3), small_grouter())
    dcp.load({"model": ModelWrapper(converted)}, checkpoint_id=str(tmp_path))
    theirs = dict(model.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in converted.named_parameters())
