"""Grouter.route with attention masks (padding) and with its own cache (routing token by token)."""

import pytest
import torch

from conftest import VOCAB, small_grouter
from grouter import GrouterCache


def pad_rows(rows, side):
    """Rows of different lengths -> (ids [B, S], mask [B, S], each row's slice of real tokens)."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), 7, dtype=torch.long)  # a real token id as padding: it must not matter
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    where = [slice(S - len(r), S) if side == "left" else slice(0, len(r)) for r in rows]
    for i, (r, sl) in enumerate(zip(rows, where)):
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask, where


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_padded_rows_route_as_unpadded(side, causal):
    g = small_grouter(causal=causal)
    rows = [torch.randint(0, VOCAB, (n,)) for n in (5, 17, 1, 12)]
    ids, mask, where = pad_rows(rows, side)
    logits = g(ids, attention_mask=mask)
    got_ids, got_w = g.route(ids, attention_mask=mask)
    for r, sl, row_logits, i, w in zip(rows, where, logits, got_ids, got_w):
        alone = g(r[None])[0]
        torch.testing.assert_close(row_logits[sl], alone, rtol=1e-5, atol=1e-5)
        want_ids, want_w = g.route(r)
        assert torch.equal(i[sl], want_ids)
        torch.testing.assert_close(w[sl], want_w)


def test_pad_positions_route_as_their_token_alone():
    g = small_grouter()
    ids, mask, _ = pad_rows([torch.randint(0, VOCAB, (n,)) for n in (3, 9)], "left")
    ids[0, :6] = torch.randint(0, VOCAB, (6,))
    logits = g(ids, attention_mask=mask)
    for j in range(6):
        torch.testing.assert_close(logits[0, j], g(ids[0, j:j + 1][None])[0, 0], rtol=1e-5, atol=1e-5)


def test_all_ones_mask_matches_no_mask(grouter_model):
    x = torch.randint(0, VOCAB, (3, 21))
    torch.testing.assert_close(grouter_model(x, attention_mask=torch.ones_like(x)), grouter_model(x),
                               rtol=1e-5, atol=1e-5)


def chunks(S):
    cuts = sorted(torch.randperm(S - 1)[: torch.randint(1, 6, ()).item()].add(1).tolist())
    return list(zip([0] + cuts, cuts + [S]))


@pytest.mark.parametrize("padded", [False, True])
def test_incremental_routing_equals_whole_sequence(grouter_model, padded):
    g = grouter_model
    x = torch.randint(0, VOCAB, (3, 26))
    mask = torch.ones_like(x)
    if padded:
        mask[0, :7] = 0  # left padding
        mask[2, :2] = 0
    whole_ids, whole_w = g.route(x, attention_mask=mask)
    whole = g(x, attention_mask=mask)
    cache = GrouterCache()
    pieces, pieces_ids = [], []
    for a, b in chunks(26):
        # transformers passes the mask of the whole sequence so far; the ids of the new tokens only
        pieces.append(g(x[:, a:b], attention_mask=mask[:, :b], cache=cache))
        pieces_ids.append(g.route_logits(pieces[-1])[0])
    assert cache.length == 26
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(pieces_ids, 1), whole_ids)
    assert torch.equal(cache.seen, mask.sum(1))


def test_token_by_token_with_new_mask_only(grouter_model):
    x = torch.randint(0, VOCAB, (2, 12))
    cache = GrouterCache()
    steps = [grouter_model(x[:, t:t + 1], cache=cache) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), grouter_model(x), rtol=1e-5, atol=1e-5)


def test_cache_follows_reorder_repeat_and_crop(grouter_model):
    g = grouter_model
    x = torch.randint(0, VOCAB, (3, 10))
    cache = GrouterCache()
    g(x[:, :6], cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(g(x[[2, 2, 0], 6:], cache=cache), g(x[[2, 2, 0]])[:, 6:], rtol=1e-5, atol=1e-5)
    cache.crop(-4)  # back to 6 positions
    assert cache.length == 6 and torch.equal(cache.seen, torch.full((3,), 6))
    cache.repeat_interleave(2)
    y = x[[2, 2, 2, 2, 0, 0]]
    torch.testing.assert_close(g(y[:, 6:], cache=cache), g(y)[:, 6:], rtol=1e-5, atol=1e-5)
    cache.reset()
    assert cache.length == 0


def test_cache_errors(grouter_model):
    x = torch.randint(0, VOCAB, (2, 5))
    cache = GrouterCache()
    grouter_model(x, cache=cache)
    with pytest.raises(ValueError, match="rows"):
        grouter_model(x[:1], cache=cache)
    with pytest.raises(ValueError, match="attention_mask"):
        grouter_model(x, attention_mask=torch.ones(2, 3), cache=cache)
    with pytest.raises(ValueError, match="bidirectional"):
        small_grouter(causal=False)(x, cache=GrouterCache())
