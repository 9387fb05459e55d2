"""teacher_server.scoring against brute-force references: top-k + exact tail, temperature, RS-KD sampling."""

from __future__ import annotations

import math

import pytest
import torch

from asymkd.contract import Signal
from teacher_server import scoring
from teacher_server.backends.base import ScoreItem, ScoreParams


def _logits(rows: int = 6, vocab: int = 50, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("k", [1, 7, 49])
def test_topk_with_tail_matches_brute_force(k):
    lp = torch.log_softmax(_logits(), dim=-1)
    ids, top_lp, tail = scoring.topk_with_tail(lp, k)
    assert ids.shape == top_lp.shape == (6, k) and tail.shape == (6,)
    for r in range(lp.shape[0]):
        ranked = sorted(range(lp.shape[1]), key=lambda v: -lp[r, v].item())
        assert ids[r].tolist() == ranked[:k]  # descending, the k largest
        assert torch.equal(top_lp[r], lp[r, ranked[:k]])
        rest_mass = sum(math.exp(lp[r, v].item()) for v in ranked[k:])  # float64, independently
        assert tail[r].item() == pytest.approx(math.log(rest_mass), abs=1e-5)


def test_topk_tail_keeps_precision_when_top_k_holds_nearly_all_mass():
    logits = torch.tensor([[30.0, 0.0, 0.0, 0.0]])
    _, _, tail = scoring.topk_with_tail(torch.log_softmax(logits, -1), 1)
    # log(3 e^0 / (e^30 + 3)) = log 3 - 30 (log(1 - p_top) would round to log(0) in float32)
    assert tail.item() == pytest.approx(math.log(3) - 30, abs=1e-4)


@pytest.mark.parametrize("top", [50.0, 100.0, 200.0])
def test_topk_tail_is_exact_when_the_rest_is_tiny_or_underflows(top):
    # rest mass 3 e^-top: 6e-22 is summed directly; 1e-43 (float32 denormals) and 0 (e^-200 underflows)
    # take the masked-logsumexp fallback; the ordinary row beside them keeps the direct sum
    logits = torch.tensor([[top, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0]])
    _, _, tail = scoring.topk_with_tail(torch.log_softmax(logits, -1), 1)
    assert tail[0].item() == pytest.approx(math.log(3) - top, abs=1e-4)
    assert tail[1].item() == pytest.approx(
        math.log((2 + math.exp(0.5)) / (math.e + 2 + math.exp(0.5))), abs=1e-6
    )


def test_topk_tail_blocks_do_not_change_results(monkeypatch):
    lp = torch.log_softmax(_logits(rows=7, vocab=50), -1)
    whole = scoring.topk_with_tail(lp, 5)
    monkeypatch.setattr(scoring, "_TAIL_BLOCK_BYTES", 3 * 50 * 4)  # blocks of 3 rows: 3 + 3 + 1
    for got, want in zip(scoring.topk_with_tail(lp, 5), whole, strict=True):
        assert torch.equal(got, want)


def test_topk_tail_is_minus_inf_when_k_is_vocab():
    lp = torch.log_softmax(_logits(vocab=10), -1)
    _, _, tail = scoring.topk_with_tail(lp, 10)
    assert torch.isneginf(tail).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_is_exact(temperature):
    logits = _logits(vocab=30).double()
    got = scoring.log_softmax_at_temperature(logits.float(), temperature)
    z = logits / temperature
    probs = torch.exp(z - z.max(-1, keepdim=True).values)
    probs = probs / probs.sum(-1, keepdim=True)  # softmax(logits / T) by hand, float64
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), probs.log(), atol=1e-5, rtol=0)


def test_half_precision_logits_are_upcast():
    logits = _logits(vocab=30).bfloat16()
    got = scoring.log_softmax_at_temperature(logits, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.log_softmax(logits.float(), -1))


def test_sample_counts_shape_padding_and_sums():
    lp = torch.log_softmax(_logits(rows=5, vocab=20, scale=1.0), -1)
    ids, counts = scoring.sample_counts(lp, 16, torch.Generator().manual_seed(1))
    assert ids.shape == counts.shape == (5, 16)
    assert (counts.sum(-1) == 16).all()
    for r in range(5):
        distinct = int((ids[r] >= 0).sum())
        assert (ids[r, distinct:] == -1).all() and (counts[r, distinct:] == 0).all()  # padding at the end
        assert (counts[r, :distinct] > 0).all()
        assert ids[r, :distinct].tolist() == sorted(set(ids[r, :distinct].tolist()))  # unique, ascending


def test_sample_counts_same_seed_same_draws():
    lp = torch.log_softmax(_logits(rows=4, vocab=40, scale=1.0), -1)
    a = scoring.sample_counts(lp, 32, torch.Generator().manual_seed(7))
    b = scoring.sample_counts(lp, 32, torch.Generator().manual_seed(7))
    c = scoring.sample_counts(lp, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_sample_counts_frequencies_match_probs():
    probs = torch.tensor([[0.7, 0.2, 0.07, 0.03, 0.0]])
    m = 20000
    ids, counts = scoring.sample_counts(probs.log(), m, torch.Generator().manual_seed(0))
    freq = torch.zeros(5)
    keep = ids[0] >= 0
    freq[ids[0][keep]] = counts[0][keep].float() / m
    assert freq[4] == 0  # zero-probability ids are never drawn
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)  # std <= 0.0033


def _item(length: int = 9, score_from: int = 2, vocab: int = 50) -> ScoreItem:
    ids = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(3))
    return ScoreItem(ids, score_from)


def test_scores_from_logits_top_k_and_target():
    item = _item()
    logits = _logits(rows=item.num_rows)
    res = scoring.scores_from_logits(logits, item, ScoreParams(signal=Signal.TOP_K, top_k=5, temperature=2.0))
    lp = torch.log_softmax(logits / 2.0, -1)
    ref_lp, ref_ids = lp.topk(5, -1)
    assert res.ids.dtype == torch.int32 and torch.equal(res.ids.long(), ref_ids)
    torch.testing.assert_close(res.logprobs, ref_lp)
    tail = torch.log(lp.exp().sum(-1) - ref_lp.exp().sum(-1))
    torch.testing.assert_close(res.tail_logprob, tail, atol=1e-5, rtol=1e-5)
    # row r predicts token score_from + 1 + r
    targets = item.token_ids[item.score_from + 1 :]
    torch.testing.assert_close(res.target_logprob, lp[torch.arange(item.num_rows), targets])
    assert res.full is None and res.counts is None and res.hidden is None


def test_scores_from_logits_target_only_full_at_ids():
    item = _item()
    logits = _logits(rows=item.num_rows)
    lp = torch.log_softmax(logits, -1)
    only = scoring.scores_from_logits(logits, item, ScoreParams(signal=Signal.TARGET_ONLY))
    assert set(only.tensors()) == {"target_logprob"}
    full = scoring.scores_from_logits(logits, item, ScoreParams(signal=Signal.FULL))
    torch.testing.assert_close(full.full, lp)
    torch.testing.assert_close(full.full.exp().sum(-1), torch.ones(item.num_rows))
    item.at_ids = torch.randint(0, 50, (item.num_rows, 4), generator=torch.Generator().manual_seed(4))
    at = scoring.scores_from_logits(logits, item, ScoreParams(signal=Signal.AT_IDS))
    torch.testing.assert_close(at.logprobs, lp.gather(-1, item.at_ids))


def test_scores_from_logits_sampled():
    item = _item()
    logits = _logits(rows=item.num_rows, scale=1.0)
    params = ScoreParams(signal=Signal.SAMPLED, num_samples=12)
    res = scoring.scores_from_logits(logits, item, params, torch.Generator().manual_seed(5))
    ref_ids, ref_counts = scoring.sample_counts(
        torch.log_softmax(logits, -1), 12, torch.Generator().manual_seed(5)
    )
    assert res.ids.dtype == res.counts.dtype == torch.int32
    assert torch.equal(res.ids.long(), ref_ids) and torch.equal(res.counts.long(), ref_counts)
    with pytest.raises(ValueError, match="Generator"):
        scoring.scores_from_logits(logits, item, params)


def test_scores_from_logits_rejects_hidden():
    item = _item()
    with pytest.raises(ValueError, match="not computed from logits"):
        scoring.scores_from_logits(_logits(rows=item.num_rows), item, ScoreParams(signal=Signal.HIDDEN))


def test_row_chunking_does_not_change_results(monkeypatch):
    item = _item(length=30, score_from=1)
    item.at_ids = torch.randint(0, 50, (item.num_rows, 3), generator=torch.Generator().manual_seed(6))
    logits = _logits(rows=item.num_rows)
    for sig in (Signal.TOP_K, Signal.AT_IDS, Signal.FULL):
        params = ScoreParams(signal=sig, top_k=4)
        whole = scoring.scores_from_logits(logits, item, params)
        monkeypatch.setattr(scoring, "CHUNK_ROWS", 4)
        chunked = scoring.scores_from_logits(logits, item, params)
        monkeypatch.undo()
        for name, t in whole.tensors().items():
            torch.testing.assert_close(chunked.tensors()[name], t)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_dtype_casting(value_dtype):
    item = _item()
    logits = _logits(rows=item.num_rows)
    for sig in (Signal.TOP_K, Signal.FULL):
        res = scoring.scores_from_logits(
            logits, item, ScoreParams(signal=sig, top_k=3, value_dtype=value_dtype)
        )
        for name, t in res.tensors().items():
            assert t.dtype == (torch.int32 if name == "ids" else value_dtype), name
        ref = torch.log_softmax(logits, -1)[torch.arange(item.num_rows), item.targets]
        torch.testing.assert_close(res.target_logprob, ref.to(value_dtype))
