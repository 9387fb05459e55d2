"""Cache encodings (student_trainer/cache/codec.py) round-trip teacher answers: ids exactly (as a set), the
tail mass bit for bit, values exactly (fp32) or within the stated bound (bf16/fp16/q8/q4), and SAMPLED
answers (ids + counts) exactly. No files: a shard's arrays are read back from memory."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from student_trainer.cache.codec import (
    ENCODINGS,
    Answers,
    decode,
    encode,
    frequency_order,
    frequency_prefix,
    order_from_prefix,
    parse_encoding,
)
from student_trainer.config import CacheEncoding

V = 1000


class Memory:
    """A shard's arrays in memory (the ShardArrays protocol)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays, self.names = arrays, frozenset(arrays)

    def get(self, name: str, a: int, b: int) -> np.ndarray:
        return self.arrays[name][a:b]


def teacher_answers(lengths: list[int], k: int, seed: int = 0, temperature: float = 1.0) -> Answers:
    """Top-k of Zipf-like distributions over V ids (frequent ids small), tail = exact mass outside."""
    g = torch.Generator().manual_seed(seed)
    p = sum(lengths)
    logits = torch.randn(p, V, generator=g, dtype=torch.float64) * 2.5 - torch.log1p(torch.arange(V)) * 0.8
    lp = torch.log_softmax(logits / temperature, dim=-1)
    top, ids = lp.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12))
    return Answers(
        lengths=np.array(lengths), ids=ids.numpy(), logprobs=top.float().numpy(), tail=tail.float().numpy(),
        target=lp[:, 0].float().numpy(),
    )  # fmt: skip


def round_trip(ans: Answers, name: str, k: int, bits: int = 10) -> list[Answers]:
    enc = parse_encoding(name)
    rank_of = frequency_order(np.arange(V)[::-1].repeat(np.arange(1, V + 1)), V)  # id V-1 most frequent
    shard = Memory(encode(ans, enc, id_bits=bits, rank_of=rank_of))
    pos = np.concatenate([[0], np.cumsum(ans.lengths)])
    order = np.argsort(rank_of)
    return [
        decode(shard, enc, row=r, pos=(int(pos[r]), int(pos[r + 1])), k=k, id_order=order)
        for r in range(len(ans.lengths))
    ]


def by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def test_the_config_lists_every_encoding():
    assert typing.get_args(CacheEncoding) == ENCODINGS


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize(("k", "bits"), [(7, 10), (64, 10), (64, 16)])  # 16: whole bytes, read as uint16
def test_every_encoding_round_trips_ids_and_the_exact_tail(name, k, bits):
    ans = teacher_answers([5, 0, 9, 1], k)
    got = round_trip(ans, name, k, bits)
    assert [len(g.ids) for g in got] == [5, 0, 9, 1]
    ids, lp = np.concatenate([g.ids for g in got]), np.concatenate([g.logprobs for g in got])
    want_ids, want_lp = by_id(ans.ids, ans.logprobs)
    got_ids, got_lp = by_id(ids, lp)
    assert np.array_equal(got_ids, want_ids)
    assert np.array_equal(np.concatenate([g.tail for g in got]), ans.tail)  # bit for bit
    enc = parse_encoding(name)
    if enc.lossless:
        assert np.array_equal(got_lp, want_lp)
        assert np.array_equal(np.concatenate([g.target for g in got]), ans.target)
        return
    # lossy: |Δ log p| <= bound; the k values and the exact tail hold all the mass
    width = (want_lp.max(1) - want_lp.min(1))[:, None]
    spread = np.abs(want_lp) + np.abs(want_lp).max(1, keepdims=True)
    bound = {
        "bf16": spread * 2.0**-9, "fp16": spread * 2.0**-11,
        "q8": width / 255 + width / 1000, "q4": width / 15 + width / 1000,
    }[enc.values]  # fmt: skip
    assert (np.abs(got_lp - want_lp) <= bound + 1e-5).all()
    mass = np.exp(got_lp.astype(np.float64)).sum(1) + np.exp(ans.tail.astype(np.float64))
    assert np.allclose(mass, 1.0, atol=1e-5)
    assert (enc.values in ("q8", "q4")) == (got[0].target is None)


def test_delta_ids_take_fewer_bytes_than_packed_ones():
    ans = teacher_answers([64], 64)
    rank_of = frequency_order(np.arange(V), V)
    size = {n: sum(a.nbytes for a in encode(ans, parse_encoding(n), id_bits=10, rank_of=rank_of).values())
            for n in ("packed-q4", "delta-q4")}  # fmt: skip
    assert size["delta-q4"] < 0.9 * size["packed-q4"]


def test_frequency_order_puts_frequent_ids_first_and_stores_only_the_seen_ones():
    tokens = np.array([5, 5, 5, 2, 2, 9])
    rank_of = frequency_order(tokens, 10)
    assert rank_of[5] == 0 and rank_of[2] == 1 and rank_of[9] == 2
    assert sorted(rank_of.tolist()) == list(range(10))  # a permutation: ids never seen rank last, by id
    prefix = frequency_prefix(tokens, 10)
    assert prefix.tolist() == [5, 2, 9]
    assert np.array_equal(order_from_prefix(prefix, 10), np.argsort(rank_of))


@pytest.mark.parametrize("name", ["packed-fp32", "delta-fp32", "delta-bf16", "delta-q4"])
def test_sampled_answers_round_trip(name):
    """SAMPLED (RS-KD): distinct drawn ids, -1 padded, their counts (exact) and the teacher's log-probs at
    them (-inf at padding; exact in fp32, else within the rounding: no tail, so no renormalization)."""
    g = torch.Generator().manual_seed(3)
    lp_all = torch.log_softmax(torch.randn(6, V, generator=g) * 3, -1)
    draws = torch.multinomial(lp_all.exp(), 12, True, generator=g)
    ids = torch.full((6, 12), -1, dtype=torch.int64)
    counts = torch.zeros((6, 12), dtype=torch.int64)
    for i, row in enumerate(draws):
        u, c = row.unique(return_counts=True)
        ids[i, : len(u)], counts[i, : len(u)] = u, c
    lp = lp_all.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf")).float()
    ans = Answers(lengths=np.array([2, 4]), ids=ids.numpy(), counts=counts.numpy(), logprobs=lp.numpy())
    got = round_trip(ans, name, 12)
    tol = {"fp32": 0.0, "bf16": 2.0**-8 * 30, "q4": 30 / 30 + 30 / 2000}[name.split("-")[1]]
    for want, have in zip((slice(0, 2), slice(2, 6)), got, strict=True):
        for w_ids, w_c, w_lp, h_ids, h_c, h_lp in zip(
            ids[want], counts[want], lp[want], have.ids, have.counts, have.logprobs, strict=True
        ):
            w = {i: (c, v) for i, c, v in zip(w_ids.tolist(), w_c.tolist(), w_lp.tolist(), strict=True)}
            h = {i: (c, v) for i, c, v in zip(h_ids.tolist(), h_c.tolist(), h_lp.tolist(), strict=True)}
            assert w.keys() == h.keys() and all(w[i][0] == h[i][0] for i in w)
            assert all(abs(w[i][1] - h[i][1]) <= tol for i in w if i >= 0)
            assert all(h[i][1] == float("-inf") for i in h if i < 0)
        assert have.tail is None


def test_an_unknown_encoding_is_named():
    with pytest.raises(ValueError, match=r"encoding='delta-q2' is not one of \['packed-fp32'"):
        parse_encoding("delta-q2")
