"""Teacher targets: the source runs once over the tokens; the pass resumes, and refuses other data,
a changed source, and truncated or edited files (checked before anything is written)."""

import json

import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import nn as gnn
from grouter.router import TeacherLogits, distill, heldout_metrics, teacher_logits
from grouter.router import teacher as teacher_module
from grouter.router.array_folder import write_header


class Source(torch.nn.Module):
    """embedding -> two learned-router MoE layers; counts the forwards it runs (and can stop after n)."""

    def __init__(self, router="softmax"):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.layers = torch.nn.ModuleList(gnn.MoE(16, 8, 8, 2, router=router) for _ in range(2))
        with torch.no_grad():
            self.layers[0].router.weight.normal_(std=1.0)
        self.calls = 0
        self.fail_after = None

    def forward(self, ids):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
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


def interrupted(tmp_path, source, x, after=3):
    """A pass killed after `after` source forwards (the probe is the first), a header every batch."""
    source.fail_after = source.calls + after
    with pytest.raises(KeyboardInterrupt):
        teacher_logits(source, x, path=tmp_path / "t", batch_size=4, progress=False)
    source.fail_after = None
    return tmp_path / "t"


def test_on_disk_equals_in_memory_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_module, "CHECKPOINT_SECONDS", 0.0)
    source, x = Source(), samples()
    mem = teacher_logits(source, x, batch_size=4, progress=False)
    path = interrupted(tmp_path, source, x)
    assert json.loads((path / "header.json").read_text())["done"] == 8
    with pytest.raises(ValueError, match="stopped after 8 of 20"):
        TeacherLogits.open(path)
    calls = source.calls
    disk = teacher_logits(source, x, path=path, batch_size=4, progress=False)
    assert source.calls - calls == 1 + 3  # probe + samples 8..19 in batches of 4
    for a, b in zip(mem.batch(0, 20), disk.batch(0, 20)):
        assert torch.equal(a, b)
    assert mem.batch(0, 20)[1].dtype == torch.float32
    calls = source.calls
    teacher_logits(source, x, path=path, batch_size=4, progress=False)
    assert source.calls - calls == 1  # complete: only the probe


def test_other_data_or_a_changed_source_is_refused_unless_overwritten(tmp_path):
    source, x = Source(), samples()
    teacher_logits(source, x, path=tmp_path / "t", batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other data or another source.*--overwrite"):
        teacher_logits(source, samples(), path=tmp_path / "t", progress=False)
    with torch.no_grad():
        source.layers[0].router.weight[0, 0] += 1  # the same files, other weights
    with pytest.raises(ValueError, match="other data or another source"):
        teacher_logits(source, x, path=tmp_path / "t", progress=False)
    fresh = teacher_logits(source, x, path=tmp_path / "t", progress=False, overwrite=True)
    assert torch.equal(fresh.batch(0, 20)[1], teacher_logits(source, x, progress=False).batch(0, 20)[1])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no teacher targets"):
        teacher_logits(source, x, path=tmp_path / "other", progress=False, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").is_file()


def _truncate(name, keep):
    def damage(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:keep(len(data))])
    return damage


def _rewrite_tokens(path):
    data = bytearray((path / "tokens.bin").read_bytes())
    data[0] ^= 1
    (path / "tokens.bin").write_bytes(bytes(data))


def _edit_header(**change):
    def damage(path):
        header = json.loads((path / "header.json").read_text())
        header.update(change)
        (path / "header.json").write_text(json.dumps(header))
    return damage


def _swap_shape_resigned(path):  # count and seq_len swapped, the header's checksum recomputed
    header = json.loads((path / "header.json").read_text())
    header["count"], header["seq_len"] = header["seq_len"], header["count"]
    header.pop("header_sha256")
    write_header(path, header)


def _claim_done_resigned(path):  # done beyond what was written, the checksum recomputed
    header = json.loads((path / "header.json").read_text())
    header["done"] = header["count"]
    header.pop("header_sha256")
    write_header(path, header)


DAMAGE = {
    "targets short by 2 bytes": (_truncate("targets.bin", lambda n: n - 2), "bytes, the header says"),
    "targets halved": (_truncate("targets.bin", lambda n: n // 2), "bytes, the header says"),
    "targets emptied": (_truncate("targets.bin", lambda n: 0), "bytes, the header says"),
    "tokens short by 4 bytes": (_truncate("tokens.bin", lambda n: n - 4), "bytes, the header says"),
    "tokens rewritten in place": (_rewrite_tokens, "not the data its header names"),
    "header edited": (_edit_header(done=3), "does not match its checksum"),
    "count and seq_len swapped": (_swap_shape_resigned, "not the data its header names|inconsistent fields"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_teacher_folders_are_refused_on_open_and_on_resume(tmp_path, damage):
    source, x = Source(), samples(20, 12)
    path = tmp_path / "t"
    teacher_logits(source, x, path=path, batch_size=4, progress=False)
    hurt, message = DAMAGE[damage]
    hurt(path)
    sizes = {f.name: f.stat().st_size for f in path.iterdir()}
    with pytest.raises(ValueError, match=message):
        TeacherLogits.open(path)
    with pytest.raises(ValueError, match=message):
        teacher_logits(source, x, path=path, batch_size=4, progress=False)
    assert {f.name: f.stat().st_size for f in path.iterdir()} == sizes  # nothing was extended or zero-filled
    again = teacher_logits(source, x, path=path, batch_size=4, progress=False, overwrite=True)
    assert again.count == 20


def test_done_beyond_what_was_written_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_module, "CHECKPOINT_SECONDS", 0.0)
    source, x = Source(), samples()
    path = interrupted(tmp_path, source, x)
    _claim_done_resigned(path)
    with pytest.raises(ValueError, match="sample 8 does not match its digest"):
        TeacherLogits.open(path)


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
    with pytest.raises(ValueError, match="must be positive"):
        distill(g, source, [samples(2)], steps=0, progress=False)
