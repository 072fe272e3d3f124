"""Token files read as --data: formats, and bad ids refused with a message that names them."""

import json

import numpy as np
import pytest

import torch

from grouter.tokens import Documents, load_documents, load_tokens, split_samples


def test_npy_and_raw_bin(tmp_path):
    ids = np.random.randint(0, 60000, 1000)
    np.save(tmp_path / "a.npy", ids.reshape(10, 100).astype(np.int32))
    assert load_tokens(tmp_path / "a.npy").tolist() == ids.tolist()
    for dtype in ("uint16", "uint32", "int32"):
        ids.astype(dtype).tofile(tmp_path / f"{dtype}.bin")
        assert load_tokens(tmp_path / f"{dtype}.bin", dtype=dtype, vocab_size=60000).tolist() == ids.tolist()
    with pytest.raises(ValueError, match=r"needs its dtype \(--dtype"):
        load_tokens(tmp_path / "uint16.bin")
    ids[:3].astype("uint16").tofile(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="not a whole number of uint32"):
        load_tokens(tmp_path / "odd.bin", dtype="uint32")


@pytest.mark.parametrize("values,dtype,match", [
    (np.array([1.0, 2.0]), None, r"f\.npy \(float64\): token ids must be integers"),
    (np.array([3, -4, 5]), None, r"f\.npy \(int64\): negative token id -4"),
    (np.array([3, 70000, 5]), None, r"f\.npy \(int64\): token id 70000 is outside the vocabulary of 50000"),
])
def test_bad_ids_are_refused(tmp_path, values, dtype, match):
    np.save(tmp_path / "f.npy", values)
    with pytest.raises(ValueError, match=match):
        load_tokens(tmp_path / "f.npy", vocab_size=50000)


def test_unknown_and_missing(tmp_path):
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match="unknown token file type .csv"):
        load_tokens(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="no such file"):
        load_tokens(tmp_path / "nope.npy")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "text": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    assert load_tokens(tmp_path / "ds").tolist() == [1, 2, 3, 4, 5]
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(tmp_path / "notok")
    with pytest.raises(ValueError, match="no input_ids column"):
        load_tokens(tmp_path / "notok")


def local_tokenizer(folder):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the routing of tokens to experts"] * 20,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "[EOS]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_text_and_jsonl_with_a_local_tokenizer(tmp_path):
    tok = local_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("routing of tokens")
    want = tok("routing of tokens", add_special_tokens=False)["input_ids"]
    assert load_tokens(tmp_path / "a.txt", tokenizer=tmp_path / "tok").tolist() == want
    lines = [json.dumps({"body": "routing of"}), json.dumps({"body": "tokens"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    first, second = (tok(t, add_special_tokens=False)["input_ids"] for t in ("routing of", "tokens"))
    got = load_tokens(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok", text_field="body").tolist()
    assert got == first + [tok.eos_token_id] + second + [tok.eos_token_id]  # documents end with EOS
    got = load_tokens(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok", text_field="body", separator="none").tolist()
    assert got == first + second
    docs = load_documents(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok", text_field="body")
    assert len(docs) == 2 and docs.document(1).tolist() == second + [tok.eos_token_id]
    with pytest.raises(ValueError, match=r"a.jsonl:1: no text field 'text'"):
        load_tokens(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok")
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        load_tokens(tmp_path / "a.txt", vocab_size=1000)
    assert load_tokens(tmp_path / "a.txt", vocab_size=256).tolist() == list(b"routing of tokens")


def test_unreadable_files_are_named(tmp_path):
    np.save(tmp_path / "big.npy", np.array([1, 2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"big\.npy \(uint64\): token id 9223372036854775813 does not fit int64"):
        load_tokens(tmp_path / "big.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy: not a readable \.npy array"):
        load_tokens(tmp_path / "empty.npy")
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe no")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        load_tokens(tmp_path / "bad.txt", vocab_size=256)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.bin \(uint16\): no tokens"):
        load_tokens(tmp_path / "empty.bin", dtype="uint16")


def test_tokenizer_folders_are_local(tmp_path):
    (tmp_path / "a.txt").write_text("routing")
    with pytest.raises(ValueError, match="tokenizr: no such folder .*nothing is downloaded"):
        load_tokens(tmp_path / "a.txt", tokenizer=tmp_path / "tokenizr")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="nothing: no tokenizer could be loaded"):
        load_tokens(tmp_path / "a.txt", tokenizer=tmp_path / "nothing")


def test_padded_datasets_keep_real_tokens_only(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [[5, 6, 7, 0, 0], [0, 0, 8, 9, 10], [11, 0, 12, 0, 0]]
    mask = [[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]
    datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": mask}).save_to_disk(tmp_path / "masked")
    docs = load_documents(tmp_path / "masked")
    assert [docs.document(i).tolist() for i in range(3)] == [[5, 6, 7], [8, 9, 10], [11, 0, 12]]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(tmp_path / "unmasked")
    assert load_tokens(tmp_path / "unmasked").numel() == 15  # no mask, no --pad-id: every id is data
    docs = load_documents(tmp_path / "unmasked", pad_id=0)  # pad runs at either end go; inner ones stay
    assert [docs.document(i).tolist() for i in range(3)] == [[5, 6, 7], [8, 9, 10], [11, 0, 12]]


def docs_of(lengths):
    starts = torch.tensor([0] + list(np.cumsum(lengths)))
    return Documents(torch.arange(int(starts[-1])), starts, "data")


def test_held_out_documents_are_whole_and_seeded():
    docs = docs_of([40] * 20)
    train, held, unit = split_samples(docs, 8, 0.1, seed=0)
    assert unit == "documents" and held.shape == (10, 8) and train.shape == (90, 8)
    held_docs = set((held // 40).unique().tolist())
    assert len(held_docs) == 2 and not held_docs & set((train // 40).unique().tolist())  # no document on both sides
    assert torch.equal(split_samples(docs, 8, 0.1, seed=0)[1], held)
    assert not torch.equal(split_samples(docs, 8, 0.1, seed=1)[1], held)
    train, held, unit = split_samples(docs_of([1000]), 8, 0.1, seed=0)  # one stream: whole samples
    assert unit == "samples" and held.shape == (12, 8) and train.shape == (113, 8)
    with pytest.raises(ValueError, match="held-out documents hold 3 real tokens"):
        split_samples(docs_of([3] + [40] * 9), 8, 0.1, seed=next(s for s in range(100) if
                      int(torch.randperm(10, generator=torch.Generator().manual_seed(s))[0]) == 0))
