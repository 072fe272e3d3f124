import json

import pytest
import torch

import grouter
from conftest import VOCAB, small_grouter


@pytest.mark.parametrize("E", [8, 300])
def test_roundtrip(tmp_path, E):
    g = small_grouter(E=E)
    tokens = torch.randint(0, VOCAB, (10, 16))
    grouter.predispatch(g, tokens, tmp_path, batch_size=4, progress=False)
    header = json.loads((tmp_path / "header.json").read_text())
    assert header["ids_dtype"] == ("uint8" if E <= 256 else "int16")
    reader = grouter.PredispatchReader(tmp_path, grouter=g)
    assert len(reader) == 10
    ids, w = g.route(tokens)
    for i, (t, sample_ids, sample_w) in enumerate(reader):
        assert torch.equal(t, tokens[i])
        assert torch.equal(sample_ids, ids[i])
        assert sample_w.dtype == torch.bfloat16
        torch.testing.assert_close(sample_w.float(), w[i], rtol=1e-2, atol=1e-2)


def test_flat_tokens_are_cut_into_samples(tmp_path):
    g = small_grouter()
    grouter.predispatch(g, torch.randint(0, VOCAB, (100,)), tmp_path, seq_len=16, progress=False)
    assert len(grouter.PredispatchReader(tmp_path)) == 6


def test_refuses_mismatches(tmp_path):
    g = small_grouter()
    grouter.predispatch(g, torch.randint(0, VOCAB, (4, 8)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another Grouter"):
        grouter.PredispatchReader(tmp_path, grouter=small_grouter())
    ids = (tmp_path / "ids.bin").read_bytes()
    (tmp_path / "ids.bin").write_bytes(ids[:-3])
    with pytest.raises(ValueError, match="header says"):
        grouter.PredispatchReader(tmp_path)
    (tmp_path / "ids.bin").write_bytes(ids)
    header = json.loads((tmp_path / "header.json").read_text())
    header["count"] = 5
    (tmp_path / "header.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="does not match its checksum"):
        grouter.PredispatchReader(tmp_path)
    with pytest.raises(ValueError, match="header.json"):
        grouter.PredispatchReader(tmp_path / "nowhere")


def test_int16_ids_are_little_endian_and_bad_ids_are_refused(tmp_path):
    import numpy as np

    g = small_grouter(E=300, K=2)  # more than 256 experts: int16 ids
    tokens = torch.randint(0, VOCAB, (3, 8))
    grouter.predispatch(g, tokens, tmp_path, progress=False)
    raw = np.fromfile(tmp_path / "ids.bin", dtype="<i2").reshape(3, 8, 2)
    assert torch.equal(torch.from_numpy(raw.astype(np.int64)), g.route(tokens)[0])
    raw[1, 2, 0] = -5  # a negative int16 id
    raw.tofile(tmp_path / "ids.bin")
    reader = grouter.PredispatchReader(tmp_path)
    reader[0]
    with pytest.raises(ValueError, match="sample 1 does not match its digest"):
        reader[1]
