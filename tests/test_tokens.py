"""Token files read as --data: formats, and bad ids refused with a message that names them."""

import json

import numpy as np
import pytest

from grouter.tokens import load_tokens


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
    tok.train_from_iterator(["the routing of tokens to experts"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_text_and_jsonl_with_a_local_tokenizer(tmp_path):
    tok = local_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("routing of tokens")
    want = tok("routing of tokens", add_special_tokens=False)["input_ids"]
    assert load_tokens(tmp_path / "a.txt", tokenizer=tmp_path / "tok").tolist() == want
    lines = [json.dumps({"body": "routing of"}), json.dumps({"body": "tokens"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    got = load_tokens(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok", text_field="body").tolist()
    assert got == tok("routing of", add_special_tokens=False)["input_ids"] + tok("tokens", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"a.jsonl:1: no text field 'text'"):
        load_tokens(tmp_path / "a.jsonl", tokenizer=tmp_path / "tok")
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        load_tokens(tmp_path / "a.txt", vocab_size=1000)
    assert load_tokens(tmp_path / "a.txt", vocab_size=256).tolist() == list(b"routing of tokens")
