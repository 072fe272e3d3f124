"""TableRouter: a token id -> experts table read off a contextual router, against a plain counting
reference; saved and loaded, routed, attached, exported by the CLI."""

import collections
import json

import numpy as np
import pytest
import torch

from conftest import VOCAB, small_grouter, token_batches
from grouter import TableRouter
from grouter.cli import main
from grouter.router import table_agreement


def reference_table(g, batches):
    """Per token id: the most frequent sorted expert set (ties: the lowest set) and its mean weights."""
    seen = collections.defaultdict(lambda: collections.defaultdict(list))
    for b in batches:
        ids, w = g.route(b)
        for t, i, ww in zip(b.reshape(-1).tolist(), ids.reshape(-1, g.top_k).tolist(), w.reshape(-1, g.top_k).tolist()):
            order = sorted(range(len(i)), key=lambda j: i[j])
            seen[t][tuple(i[j] for j in order)].append([ww[j] for j in order])
    table = {}
    for t, sets in seen.items():
        best = min(sets, key=lambda s: (-len(sets[s]), s))
        table[t] = (best, np.mean(sets[best], 0))
    return table


def test_from_routes_keeps_each_ids_most_frequent_set_and_its_mean_weights():
    torch.manual_seed(0)
    g = small_grouter().eval()
    batches = token_batches(n=2, B=2, S=16, seed=int(torch.randint(1 << 30, ())))  # ids seen 0, 1 or more times
    table = TableRouter.from_routes(g, batches)
    assert table.expert_ids.shape == (VOCAB, g.top_k) and table.num_experts == g.num_experts
    want = reference_table(g, batches)
    for t, (ids, w) in want.items():
        assert tuple(table.expert_ids[t].tolist()) == ids
        torch.testing.assert_close(table.weights[t], torch.tensor(w, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    unseen = [v for v in range(VOCAB) if v not in want]
    assert unseen  # the batches miss some ids: they take the route of the id alone
    alone_ids, alone_w = g.route(torch.tensor(unseen).view(-1, 1))
    assert torch.equal(table.expert_ids[unseen], alone_ids.reshape(-1, g.top_k).sort(1).values)


def test_route_save_load_and_agreement(tmp_path):
    g = small_grouter().eval()
    table = TableRouter.from_routes(g, token_batches(n=3))
    x = torch.randint(0, VOCAB, (3, 7))
    ids, w = table.route(x)
    assert ids.shape == w.shape == (3, 7, g.top_k) and torch.equal(ids[1, 2], table.expert_ids[x[1, 2]])
    with pytest.raises(ValueError, match="outside the table's vocabulary"):
        table.route(torch.tensor([[VOCAB]]))
    path = table.save(tmp_path / "t.safetensors")
    again = TableRouter.load(path)
    assert torch.equal(again.expert_ids, table.expert_ids) and torch.equal(again.weights, table.weights)
    assert again.checksum() == table.checksum()
    assert table_agreement(table, again, token_batches(n=2))["same_set"] == 1.0
    a = table_agreement(table, g, token_batches(n=2, seed=5))
    assert 0 < a["same_set"] <= a["shared_experts"] <= 1
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["weights"][3, 0] += 0.25  # an edited weight under the old metadata
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="checksum"):
        TableRouter.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="distinct"):
        TableRouter(torch.tensor([[1, 1]]), torch.ones(1, 2), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        TableRouter(torch.tensor([[1, 4]]), torch.ones(1, 2), 4)


def test_export_table_command(tmp_path, capsys):
    small_grouter().save(tmp_path / "g")
    np.save(tmp_path / "tokens.npy", np.random.randint(0, VOCAB, 4000))
    args = ["export-table", str(tmp_path / "g"), "--data", str(tmp_path / "tokens.npy"), "--seq-len", "32",
            "--out", str(tmp_path / "table.safetensors")]
    assert main(args) == 0
    table = TableRouter.load(tmp_path / "table.safetensors")
    report = json.loads((tmp_path / "table.json").read_text())
    assert report["table_checksum"] == table.checksum() and report["heldout"]["samples"] > 0
    assert 0 <= report["heldout"]["same_set"] <= report["heldout"]["shared_experts"] <= 1
    assert main(args) == 2  # the file is in the way
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
