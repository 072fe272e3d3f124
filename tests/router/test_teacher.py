"""Teacher logits: the source runs once over the tokens; the pass resumes and refuses other data."""

import json

import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import nn as gnn
from grouter.router import TeacherLogits, distill, heldout_metrics, teacher_logits


class Source(torch.nn.Module):
    """embedding -> two learned-router MoE layers; counts the forwards it runs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList(gnn.MoE(16, 8, 8, 2, router="softmax") for _ in range(2))
        with torch.no_grad():
            self.layers[0].router.weight.normal_(std=1.0)
        self.calls = 0

    def forward(self, ids):
        self.calls += 1
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


class BigVocabSource(Source):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB + 10, 16)


def samples(n=20, S=16):
    return torch.randint(0, VOCAB, (n, S))


def test_source_runs_once_for_many_epochs():
    source, x = Source(), samples()
    g = small_grouter()
    teacher = teacher_logits(source, x, batch_size=4, progress=False)
    calls = source.calls
    distill(g, teacher, steps=40, batch_size=4, progress=False)  # 8 epochs
    assert source.calls == calls == 1 + 5  # one probe for the expert count, then one pass
    assert heldout_metrics(g, teacher)["kl"] < heldout_metrics(small_grouter(), teacher)["kl"]


def test_on_disk_equals_in_memory_and_resumes(tmp_path):
    source, x = Source(), samples()
    mem = teacher_logits(source, x, batch_size=4, progress=False)
    disk = teacher_logits(source, x, path=tmp_path / "t", batch_size=4, source_id="s", progress=False)
    t1, l1 = mem.batch(0, 20)
    t2, l2 = disk.batch(0, 20)
    assert torch.equal(t1, t2) and torch.equal(l1, l2) and l1.dtype == torch.float32
    # An interrupted pass: the header says 2 samples are done; only the rest is computed again.
    header = json.loads((tmp_path / "t" / "header.json").read_text())
    header["done"] = 2
    (tmp_path / "t" / "header.json").write_text(json.dumps(header))
    calls = source.calls
    again = teacher_logits(source, x, path=tmp_path / "t", batch_size=4, source_id="s", progress=False)
    assert source.calls - calls == 1 + 5  # probe + samples 2..19 in batches of 4
    assert torch.equal(again.batch(0, 20)[1], l1)
    done = teacher_logits(source, x, path=tmp_path / "t", batch_size=4, source_id="s", progress=False)
    assert done.count == 20
    with pytest.raises(ValueError, match="other data or another source"):
        teacher_logits(source, samples(), path=tmp_path / "t", source_id="s", progress=False)
    with pytest.raises(ValueError, match="other data or another source"):
        teacher_logits(source, x, path=tmp_path / "t", source_id="other", progress=False)
    (tmp_path / "t" / "logits.bin").write_bytes(b"short")
    with pytest.raises(ValueError, match="bytes, the header says"):
        TeacherLogits.open(tmp_path / "t")


def test_distill_input_errors():
    source, g = Source(), small_grouter()
    with pytest.raises(ValueError, match=r"\[B, S\] tensor"):
        distill(g, source, torch.randint(0, VOCAB, (50,)), steps=1, progress=False)
    with pytest.raises(ValueError, match="integers"):
        distill(g, source, [torch.rand(2, 8)], steps=1, progress=False)
    with pytest.raises(ValueError, match="outside the Grouter's vocabulary"):
        distill(g, BigVocabSource(), [torch.full((2, 8), VOCAB + 3)], steps=1, progress=False)
    with pytest.raises(ValueError, match="experts"):
        distill(small_grouter(E=6), source, [samples(2)], steps=1, progress=False)
