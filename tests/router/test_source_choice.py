"""The teacher is the source's real choice: sigmoid routers with a correction bias and group limits
(DeepSeek-V3, GLM-4-MoE) are distilled toward what their blocks select, and top-k agreement is
measured against the ids the block chose."""

import pytest
import torch

import grouter
from grouter.nn.learned_routers import SigmoidTopKRouter
from grouter.router import distill, heldout_metrics, teacher_logits
from grouter.router.capture import SourceCapture, check_choice
from grouter.router.source_rule import RouterRule, choice_of, rule_of, teacher_scores
from sources import VOCAB, chosen_by_the_gate, family_model

RULES = {
    "softmax": RouterRule("softmax"),
    "sigmoid": RouterRule("sigmoid"),
    "sigmoid+bias": RouterRule("sigmoid", torch.randn(16)),
    "sigmoid+large negative bias": RouterRule("sigmoid", torch.randn(16) * 3 - 2),
    "sigmoid+bias+groups": RouterRule("sigmoid", torch.randn(16) * 0.1, n_group=4, topk_group=2),
    "softmax+groups (max)": RouterRule("softmax", None, n_group=4, topk_group=1, group_score="max"),
    "softmax+bias": RouterRule("softmax", torch.rand(16) * 0.05),
}


@pytest.mark.parametrize("name", list(RULES))
def test_the_teacher_distribution_ranks_the_choice_first(name):
    rule = RULES[name]
    logits = torch.randn(500, 16) * 3
    z = teacher_scores(logits, rule)
    p = z.softmax(-1)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(500))
    for k in (1, 2, 4):
        chosen = choice_of(logits, rule, k).sort(-1).values
        assert torch.equal(z.topk(k, -1).indices.sort(-1).values, chosen)
    if rule.n_group > 1:  # experts outside the chosen groups get no teacher mass (nor those with c <= 0)
        assert ((p == 0).sum(-1) >= 16 // rule.n_group * (rule.n_group - rule.topk_group)).all()
    if name == "softmax":
        assert torch.equal(z, logits)  # the paper's target: softmax of the source logits
    if name == "sigmoid":  # the normalised affinity
        torch.testing.assert_close(p, logits.sigmoid() / logits.sigmoid().sum(-1, keepdim=True))


def test_a_misread_router_is_refused():
    logits, ids = torch.randn(200, 8), None
    bias = torch.randn(8)
    ids = choice_of(logits, RouterRule("sigmoid", bias), 2)
    assert check_choice(logits, ids, RouterRule("sigmoid", bias)) == 1.0
    with pytest.raises(ValueError, match="chose other experts than grouter's reading of it .* not supported"):
        check_choice(logits, ids, RouterRule("softmax"))


def test_grouter_nn_sigmoid_router_with_its_bias():
    router = SigmoidTopKRouter(16, 8, 2)
    router.expert_bias.normal_()
    rule = rule_of(router)
    assert rule.score == "sigmoid" and torch.equal(rule.bias, router.expert_bias)


SETUPS = [("deepseek_v3", 0.1, 1, 1), ("deepseek_v3", 1.0, 1, 1), ("deepseek_v3", 0.1, 4, 2),
          ("glm4_moe", 0.1, 1, 1), ("glm4_moe", 1.0, 4, 2)]


def agreement_from_the_source(g, model, tokens):
    """Independently of grouter's teacher: the fraction of the gate's own chosen ids in g's top-k."""
    theirs = chosen_by_the_gate(model, tokens)
    with torch.no_grad():
        mine = g(tokens).reshape(-1, g.num_experts).topk(theirs.shape[-1], -1).indices
    return float((mine[:, :, None] == theirs[:, None, :]).any(-1).float().mean())


def distilled(model, seed=0):
    torch.manual_seed(1)
    data = torch.randint(0, VOCAB, (112, 24))
    train, held = data[:96], data[96:]
    teacher, teacher_held = teacher_logits(model, train, progress=False), teacher_logits(model, held, progress=False)
    torch.manual_seed(seed)
    g = grouter.Grouter(VOCAB, 8, 2, d_model=32, n_layers=1, n_heads=2)
    before = heldout_metrics(g, teacher_held)
    distill(g, teacher, steps=150, batch_size=16, lr=4e-3, progress=False)
    return g, held, before, heldout_metrics(g, teacher_held), teacher_held


@pytest.fixture(scope="module")
def softmax_agreement():
    return distilled(family_model("qwen3_moe"))[3]["topk_agreement"]


@pytest.mark.parametrize("family,bias,n_group,topk_group", SETUPS)
def test_sigmoid_sources_are_distilled_toward_their_real_choice(family, bias, n_group, topk_group, softmax_agreement):
    model = family_model(family, bias_std=bias, n_group=n_group, topk_group=topk_group)
    gate = grouter.nn.moe_blocks(model)[0][1].gate
    rule = rule_of(gate)
    assert rule.score == "sigmoid" and torch.equal(rule.bias, gate.e_score_correction_bias)
    g, held, before, after, teacher_held = distilled(model)
    # the teacher keeps exactly the ids the gate hands the experts
    assert torch.equal(teacher_held.batch(0, 16)[2].reshape(-1, 2).sort(-1).values,
                       chosen_by_the_gate(model, held).sort(-1).values)
    # the reported agreement is the agreement with the source's own choice
    assert after["topk_agreement"] == pytest.approx(agreement_from_the_source(g, model, held), abs=1e-6)
    assert after["topk_agreement"] >= 0.9 * softmax_agreement, (after["topk_agreement"], softmax_agreement)
    assert after["topk_agreement"] > before["topk_agreement"] + 0.4


def test_the_capture_stops_before_the_experts_and_reads_the_block():
    model = family_model("deepseek_v3", bias_std=1.0, n_group=4, topk_group=2)
    ran = []
    grouter.nn.moe_blocks(model)[0][1].experts.register_forward_hook(lambda *a: ran.append(1))
    tokens = torch.randint(0, VOCAB, (3, 10))
    with SourceCapture(model, 0) as cap:
        logits, ids = cap.run(tokens)
    assert ran == [] and logits.shape == (30, 8) and ids.shape == (30, 2)
    assert torch.equal(ids.sort(-1).values, chosen_by_the_gate(model, tokens).sort(-1).values)
    assert "correction bias" in cap.rule.describe() and "best 2 of 4 groups" in cap.rule.describe()


@pytest.mark.parametrize("family,n_group,topk_group,described", [
    ("qwen3_moe", 1, 1, "softmax"),
    ("deepseek_v2", 4, 2, "softmax + best 2 of 4 groups (max)"),
    ("deepseek_v3", 2, 1, "sigmoid + correction bias + best 1 of 2 groups (top2_sum)"),
    ("glm4_moe", 1, 1, "sigmoid + correction bias"),
])
def test_every_family_reading_reproduces_its_block(family, n_group, topk_group, described):
    model = family_model(family, bias_std=0.5, n_group=n_group, topk_group=topk_group)
    tokens = torch.randint(0, VOCAB, (12, 16))
    teacher = teacher_logits(model, tokens, batch_size=4, progress=False)  # checks the reading on every batch
    assert teacher.header["rule"] == described
    assert torch.equal(teacher.batch(0, 12)[2].reshape(-1, 2).sort(-1).values,
                       chosen_by_the_gate(model, tokens).sort(-1).values)
