"""Pre-dispatched routes through torchtitan's data path: PredispatchedDataset -> torchtitan's
ParallelAwareDataloader -> the trainer's `model(inputs, **extra_kwargs)` -> the converted model."""

import pytest

pytest.importorskip("torchtitan", reason="grouter[titan] is not installed")

import torch  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402

import grouter  # noqa: E402
import grouter.titan as gt  # noqa: E402
from titan_models import E, K, build, small_grouter, tokens  # noqa: E402


@pytest.fixture
def routed(tmp_path):
    g = small_grouter()
    samples = tokens(batch=8, length=17, seed=5)
    grouter.predispatch(g, samples, tmp_path / "routes")
    return g, samples, grouter.PredispatchReader(tmp_path / "routes", g)


def _as_trainer_does(model, input_dict, labels):
    input_dict = dict(input_dict)
    inputs = input_dict.pop("input")
    return model(inputs, **input_dict)


def test_batches_carry_each_samples_stored_routes_into_the_model(routed):
    g, samples, reader = routed
    loader = ParallelAwareDataloader(gt.PredispatchedDataset(reader), dp_rank=0, dp_world_size=1, batch_size=2)
    model = gt.convert(build(), None)  # no Grouter: the routes can only come from the batches
    seen = 0
    for input_dict, labels in loader:
        assert torch.equal(torch.cat([input_dict["input"], labels[:, -1:]], 1), samples[seen:seen + 2])
        _as_trainer_does(model, input_dict, labels).sum().backward()
        ids, w = g.route(input_dict["input"])
        step = model.grouter_routes.routing
        assert torch.equal(step.expert_ids, ids.reshape(-1, K))  # routes of the input positions
        torch.testing.assert_close(step.weights, w.reshape(-1, K).bfloat16().float(), rtol=0, atol=0)
        seen += 2
    assert seen == 8


def test_a_dataset_whose_tokens_are_not_the_routed_ones_is_refused(routed):
    _, samples, reader = routed
    theirs = [({"input": s[:-1]}, s[1:]) for s in samples]
    items = list(gt.PredispatchedDataset(reader, dataset=theirs))
    assert len(items) == 8 and all(torch.equal(a["input"], b[0]["input"]) for a, b in zip(
        [i[0] for i in items], theirs))
    shifted = theirs[1:] + theirs[:1]
    with pytest.raises(ValueError, match="sample 0 is not the routed sample 0"):
        list(gt.PredispatchedDataset(reader, dataset=shifted))


def test_ranks_interleave_and_counts_by_rank_sum_to_the_steps_counts(routed):
    _, samples, reader = routed
    per_rank = [list(gt.PredispatchedDataset(reader, rank=r, world_size=3, counts_by_rank=True)) for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 2]  # 8 samples, 3 ranks: the remainder is dropped
    for r in range(3):
        for j, (item, _) in enumerate(per_rank[r]):
            assert torch.equal(item["input"], samples[3 * j + r][:-1])
            counts = item["grouter_counts_by_rank"]
            assert counts.shape == (3, E)
            for r2 in range(3):
                assert torch.equal(counts[r2], torch.bincount(per_rank[r2][j][0]["grouter_expert_ids"].reshape(-1),
                                                              minlength=E))


def test_resume_continues_at_the_next_sample_also_on_another_world_size(routed):
    _, samples, reader = routed
    ds = gt.PredispatchedDataset(reader, rank=0, world_size=2)
    it = iter(ds)
    next(it), next(it)  # two samples per rank consumed: 4 in all
    state = ds.state_dict()
    assert state == {"samples_consumed": 4}
    resumed = gt.PredispatchedDataset(reader, rank=1, world_size=4)
    resumed.load_state_dict(state)
    (item, _), = list(resumed)
    assert torch.equal(item["input"], samples[4 * 1 + 1][:-1])
    with pytest.raises(ValueError, match="not a multiple"):
        gt.PredispatchedDataset(reader, world_size=3).load_state_dict(state)


def test_counts_by_rank_are_not_needed_without_expert_parallelism(routed):
    # Without an EP mesh the counts are not read; their check against the routes is in the EP test.
    _, samples, reader = routed
    model = gt.convert(build(), None)
    (input_dict, labels), = list(ParallelAwareDataloader(gt.PredispatchedDataset(reader, counts_by_rank=True),
                                                         dp_rank=0, dp_world_size=1, batch_size=8))
    _as_trainer_does(model, input_dict, labels)
    assert model.grouter_routes.splits is None


def test_the_readme_snippet_trains_on_pre_dispatched_routes(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Train a torchtitan model on pre-dispatched routes"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["model"].grouter_routes.plans_built == 4  # 16 samples / 4


class _Mesh:
    """What StepRoutes reads of an expert-parallel mesh when the counts come with the batch."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def get_local_rank(self):
        return self._rank


def test_counts_by_rank_give_the_splits_and_must_count_this_ranks_routes(routed):
    from types import SimpleNamespace

    _, _, reader = routed
    batch = [item for _, item in zip(range(2), gt.PredispatchedDataset(reader, rank=1, world_size=2,
                                                                        counts_by_rank=True))]
    input_dict, labels = gt.PredispatchedDataset.collate(batch)
    counts = input_dict["grouter_counts_by_rank"]
    assert isinstance(counts, gt.HostCounts) and counts.counts.shape == (2, E)  # summed over the batch
    routes = gt.StepRoutes(None, E, K)
    routes.dispatchers = [SimpleNamespace(ep_mesh=_Mesh(2, 1))]
    routes.prepare(input_dict["grouter_expert_ids"], input_dict["grouter_weights"], input_dict["input"], counts)
    c = counts.counts
    assert routes.splits.input_splits == [int(c[1, :4].sum()), int(c[1, 4:].sum())]  # rank 1 sends to ranks 0, 1
    assert routes.splits.output_splits == [int(c[0, 4:].sum()), int(c[1, 4:].sum())]  # receives for experts 4..7
    assert torch.equal(routes.splits.recv_counts, c[:, 4:].reshape(-1))
    assert routes.count_exchanges == 0
    swapped = gt.HostCounts(c.flip(0))  # rank 0's counts in rank 1's row
    with pytest.raises(RuntimeError, match="does not count this rank's routes"):
        routes.prepare(input_dict["grouter_expert_ids"], input_dict["grouter_weights"], input_dict["input"], swapped)
    with pytest.raises(ValueError, match="expected"):
        routes.prepare(input_dict["grouter_expert_ids"], input_dict["grouter_weights"], input_dict["input"], c[:1])
