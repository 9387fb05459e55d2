"""The vllm backend (real vLLM, the CPU build) against the hf backend on the same fp32 model.

Engines are shared per module: one TP=1 pooling engine and one TP=1 generate engine in this process, and one
real server (`--vllm.runner both`, TP=2: two engines × two workers) that also checks a clean SIGTERM.

Test model: the tiny random Llama with its output layer scaled ×30, so distributions are peaked (top-64
tail mass down to ~1e-6: a real test of the exact tail) and logprob gaps are mostly far above the ~1e-5 fp32
differences between two engines' kernels. Near-ties still occur deep in a top-64 (gaps ~1e-6), where either
order is correct: `assert_topk_equal` accepts an id at a position only if the reference gives it the same
logprob as the reference's own id there (within 1e-5), and otherwise requires identical ids.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymkd.contract import Signal, tokenizer_hash
from teacher_server.backends import vllm_logprobs
from teacher_server.backends.base import GenerateParams, ScoreItem, ScoreParams, UnsupportedSignal
from teacher_server.backends.hf import HFBackend
from teacher_server.backends.vllm import VLLMBackend, omp_threads_bind
from teacher_server.config import ServeConfig, VLLMOptions
from teacher_server.launch import LocalTeacher

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # skipped without vLLM (tests/conftest.py)

TOL = 1e-4
TIE = 1e-5  # two engines' fp32 kernels differ by ~1e-5 at most on this model
KV_BYTES = 64 << 20  # per engine: the tiny model needs ~1 KiB per token
SHAPES = [(40, 0), (70, 5), (100, 98), (2, 0), (130, 64)]  # (length, score_from)
VOCAB = 512


class LoopThread:
    """One event loop for the module: a vLLM AsyncLLM belongs to the loop that first used it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def collect(self, agen, timeout_s: float = 300) -> list:
        async def drain():
            return [x async for x in agen]

        return self.run(drain(), timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def sharp_dir(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher with its output layer ×30 (peaked distributions; see the module docstring)."""
    out = tmp_path_factory.mktemp("vllm") / "sharp"
    shutil.copytree(tiny_teacher_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 30
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def hf(loop, sharp_dir):
    backend = HFBackend(ServeConfig(model=str(sharp_dir), max_top_k=VOCAB))
    loop.run(backend.start())
    yield backend
    loop.run(backend.close())


def _vllm_cfg(model_dir, runner: str, tp: int = 1) -> ServeConfig:
    # 64-token engine steps: the longer test sequences are prefilled in chunks (hidden states and prompt
    # logprobs must come out whole all the same)
    opts = VLLMOptions(
        runner=runner,
        kv_cache_memory_bytes=KV_BYTES,
        enforce_eager=True,
        max_num_batched_tokens=64,
        max_num_seqs=8,
    )
    return ServeConfig(
        model=str(model_dir), backend="vllm", max_top_k=VOCAB, tensor_parallel_size=tp, vllm=opts
    )


@pytest.fixture(scope="module")
def engines(loop, sharp_dir):
    """(pooling backend, generate backend), TP=1, started concurrently."""
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    pool, gen = VLLMBackend(_vllm_cfg(sharp_dir, "pooling")), VLLMBackend(_vllm_cfg(sharp_dir, "generate"))

    async def start_both():
        await asyncio.gather(pool.start(), gen.start())

    loop.run(start_both())
    yield pool, gen
    loop.run(pool.close())
    loop.run(gen.close())
    if saved is None:  # the backend derived it for TP=1; later servers derive their own
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


@pytest.fixture(scope="module")
def pool(engines):
    return engines[0]


@pytest.fixture(scope="module")
def gen(engines):
    return engines[1]


def _items(shapes=SHAPES, seed=0) -> list[ScoreItem]:
    g = torch.Generator().manual_seed(seed)
    return [ScoreItem(torch.randint(0, VOCAB, (n,), generator=g), sf) for n, sf in shapes]


def assert_topk_equal(ids, ref_ids, ref_full) -> int:
    """ids (R, k) vs the reference ids (R, k); a differing id must be a near-tie under the reference
    distribution ref_full (R, V). Returns the number of tie swaps."""
    ids, ref_ids = ids.long(), ref_ids.long()
    differ = ids != ref_ids
    lp_here = ref_full.gather(-1, ids)
    lp_ref = ref_full.gather(-1, ref_ids)
    assert ((lp_here - lp_ref).abs()[differ] <= TIE).all(), "top-k ids differ beyond near-ties"
    return int(differ.sum())


PARITY: dict[str, float] = {}  # largest difference seen per check (printed at the end with `pytest -s`)


@pytest.fixture(scope="module", autouse=True)
def _report_parity():
    yield
    for name, value in sorted(PARITY.items()):
        print(f"[vllm parity] {name:<40} max |diff| {value:.2e}")


def _max_diff(a: torch.Tensor, b: torch.Tensor, name: str = "") -> float:
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "-inf in one result but not the other"
    diff = float((a[finite].double() - b[finite].double()).abs().max()) if finite.any() else 0.0
    if name:
        PARITY[name] = max(PARITY.get(name, 0.0), diff)
    return diff


def _ref_full(loop, hf, items, temperature) -> list[torch.Tensor]:
    full = loop.run(hf.score(items, ScoreParams(signal=Signal.FULL, temperature=temperature)))
    return [s.full for s in full]


# ---------------------------------------------------------------------------------------------- info


def test_info_matches_the_model(pool, gen, hf, sharp_dir):
    for b in (pool, gen):
        i = b.info
        assert (i.backend, i.vocab_size, i.hidden_size, i.max_seq_len, i.max_top_k) == (
            "vllm",
            512,
            64,
            512,
            512,
        )
        assert i.tokenizer_hash == tokenizer_hash(sharp_dir) == hf.info.tokenizer_hash != ""
        assert i.eos_token_ids == hf.info.eos_token_ids and i.dtype == "float32"
    assert set(pool.info.signals) == set(Signal) and "no Generate" in pool.info.note
    assert set(gen.info.signals) == {Signal.TOP_K, Signal.TARGET_ONLY} and gen.info.note.endswith(
        "; Generate"
    )


def test_omp_threads_bind_splits_allowed_cores():
    assert omp_threads_bind(1, [0, 1]) == "0-1"
    assert omp_threads_bind(2, [1, 0]) == "0|1"
    assert omp_threads_bind(2, [0, 1, 2, 3, 5, 6]) == "0-2|3,5-6"
    assert omp_threads_bind(3, [0, 1]) == "0|1|0"


def test_bad_options_fail_at_start_without_engine_processes(loop, sharp_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    cases = [
        (ServeConfig(model=str(tmp_path / "missing"), backend="vllm"), FileNotFoundError, "no config.json"),
        (ServeConfig(model=str(gguf), backend="vllm"), ValueError, "GGUF"),
        (_vllm_cfg(sharp_dir, "pooling"), ValueError, "extra_engine_args"),
    ]
    cases[2][0].vllm.extra_engine_args = {"no_such_engine_arg": 1}
    for cfg, exc, text in cases:
        backend = VLLMBackend(cfg)
        with pytest.raises(exc, match=text):
            loop.run(backend.start())
        loop.run(backend.close())  # safe after a failed start
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


# ---------------------------------------------------------------------------- pooling runner: exact


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_pooling_top_k_equals_hf(loop, pool, hf, temperature):
    items = _items()
    refs = _ref_full(loop, hf, items, temperature)
    for k in (1, 64, VOCAB):
        params = ScoreParams(signal=Signal.TOP_K, top_k=k, temperature=temperature)
        got, want = loop.run(pool.score(items, params)), loop.run(hf.score(items, params))
        for g, w, full in zip(got, want, refs, strict=True):
            assert g.ids.shape == w.ids.shape == (w.target_logprob.shape[0], k)
            assert_topk_equal(g.ids, w.ids, full)
            assert _max_diff(g.logprobs, w.logprobs, "pooling TP1 top-k logprobs") <= TOL
            assert _max_diff(g.tail_logprob, w.tail_logprob, "pooling TP1 tail (exact)") <= TOL
            assert _max_diff(g.target_logprob, w.target_logprob, "pooling TP1 target") <= TOL
            if k == VOCAB:
                assert torch.isneginf(g.tail_logprob).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_pooling_full_hidden_at_ids_equal_hf(loop, pool, hf, temperature):
    items = _items()
    g = torch.Generator().manual_seed(3)
    for it in items:
        it.at_ids = torch.randint(0, VOCAB, (it.num_rows, 5), generator=g)
    for sig in (Signal.FULL, Signal.HIDDEN, Signal.AT_IDS, Signal.TARGET_ONLY):
        params = ScoreParams(signal=sig, temperature=temperature)
        got, want = loop.run(pool.score(items, params)), loop.run(hf.score(items, params))
        for a, b in zip(got, want, strict=True):
            assert a.tensors().keys() == b.tensors().keys()
            for name, t in b.tensors().items():
                assert _max_diff(a.tensors()[name], t, f"pooling TP1 {sig.name}.{name}") <= TOL
            if sig == Signal.FULL:
                assert torch.allclose(a.full.logsumexp(-1), torch.zeros(a.full.shape[0]), atol=1e-5)


def test_pooling_sampled_is_reproducible(loop, pool):
    items = _items()
    params = ScoreParams(signal=Signal.SAMPLED, num_samples=16, seed=7)
    a, b = loop.run(pool.score(items, params)), loop.run(pool.score(items, params))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.counts, y.counts)
        assert (x.counts.sum(-1) == 16).all()


# ----------------------------------------------------------------- generate runner: prompt logprobs


def test_prompt_logprobs_top_k_equals_hf(loop, gen, hf):
    assert vllm_logprobs.install_tensor_capture(), "prompt logprobs should arrive as tensors"
    items = _items()
    refs = _ref_full(loop, hf, items, 1.0)
    for k in (1, 8, 64, VOCAB):
        params = ScoreParams(signal=Signal.TOP_K, top_k=k)
        got, want = loop.run(gen.score(items, params)), loop.run(hf.score(items, params))
        for g, w, full in zip(got, want, refs, strict=True):
            assert_topk_equal(g.ids, w.ids, full)
            assert _max_diff(g.logprobs, w.logprobs, "prompt-logprobs TP1 top-k logprobs") <= TOL
            assert _max_diff(g.target_logprob, w.target_logprob, "prompt-logprobs TP1 target") <= TOL
            # derived tail (vllm_logprobs.py): as exact as the top-k in probability (|Δp| <= Σ p_i |Δlogp_i|),
            # in log space only where the mass is not tiny (here >= 1e-2)
            mass_g, mass_w = g.tail_logprob.double().exp(), w.tail_logprob.double().exp()
            assert _max_diff(mass_g, mass_w, "prompt-logprobs TP1 tail mass") <= 1e-5
            big = mass_w >= 1e-2
            assert (
                _max_diff(g.tail_logprob[big], w.tail_logprob[big], "prompt-logprobs TP1 log-tail m>=1e-2")
                <= TOL
            )
            _max_diff(g.tail_logprob, w.tail_logprob, "prompt-logprobs TP1 log-tail (all; info)")
            if k == VOCAB:
                assert torch.isneginf(g.tail_logprob).all()
    target = loop.run(gen.score(items, ScoreParams(signal=Signal.TARGET_ONLY)))
    for g, w in zip(target, loop.run(hf.score(items, ScoreParams(signal=Signal.TARGET_ONLY))), strict=True):
        assert g.ids is None and _max_diff(g.target_logprob, w.target_logprob) <= TOL


def test_prompt_logprobs_refuse_what_they_cannot_do_exactly(loop, gen):
    items = _items()[:1]
    with pytest.raises(UnsupportedSignal, match=r"temperature 2.*pooling"):
        loop.run(gen.score(items, ScoreParams(signal=Signal.TOP_K, top_k=4, temperature=2.0)))
    with pytest.raises(UnsupportedSignal, match=r"FULL.*pooling"):
        loop.run(gen.score(items, ScoreParams(signal=Signal.FULL)))


# ----------------------------------------------------------------------------------------- generate


def _samples(chunks) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    for c in chunks:
        s = out.setdefault((c.prompt_index, c.sample_index), {"ids": [], "lp": [], "top": [], "fin": []})
        assert not s["fin"], "a chunk after the finished one"
        s["ids"] += c.token_ids
        s["lp"].append(c.logprobs)
        if c.top_ids is not None:
            s["top"].append((c.top_ids, c.top_logprobs))
        if c.finished:
            s["fin"].append(c.finish_reason)
    return out


PROMPTS = [torch.tensor([5, 6, 7, 8]), torch.tensor([100, 200, 300]), torch.tensor([9, 10])]


def test_greedy_generate_equals_hf(loop, gen, hf):
    """vLLM's greedy tokens are the teacher's argmax at every step, as hf scores the same sequence.

    Checked teacher-forced (not by comparing two free-running decodes), so a near-tie that the two engines
    break differently at the 1e-6 level cannot make the test flaky, while a wrong token still fails it.
    """
    params = GenerateParams(max_new_tokens=12, greedy=True, top_k_logprobs=4)
    got = _samples(loop.collect(gen.generate(PROMPTS, params)))
    assert got.keys() == {(p, 0) for p in range(len(PROMPTS))}
    items = [
        ScoreItem(torch.cat([PROMPTS[p], torch.tensor(g["ids"])]), len(PROMPTS[p]) - 1)
        for (p, _), g in got.items()
    ]
    forced = loop.run(hf.score(items, ScoreParams(signal=Signal.TOP_K, top_k=4)))
    for g, f in zip(got.values(), forced, strict=True):
        assert len(g["ids"]) == 12 and g["fin"] == ["length"]
        # the chosen token is an argmax (within TOL of hf's best) at every step
        assert torch.all(f.target_logprob >= f.logprobs[:, 0] - TOL), (f.target_logprob, f.logprobs[:, 0])
        assert _max_diff(torch.cat(g["lp"]), f.target_logprob, "generate TP1 greedy token logprobs") <= TOL
        gl = torch.cat([t[1] for t in g["top"]])
        assert _max_diff(gl, f.logprobs, "generate TP1 greedy top-4 logprobs") <= TOL


def test_sampled_logprobs_are_at_the_request_temperature(loop, gen, hf):
    params = GenerateParams(max_new_tokens=6, temperature=0.7, n=2, seed=5)
    got = _samples(loop.collect(gen.generate(PROMPTS, params)))
    again = _samples(loop.collect(gen.generate(PROMPTS, params)))
    assert got.keys() == {(p, s) for p in range(len(PROMPTS)) for s in range(2)}
    assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in again.items()}  # seeded
    # each sampled token's logprob = the teacher's log_softmax(logits / 0.7) at that position (hf, forced)
    items = [
        ScoreItem(torch.cat([PROMPTS[p], torch.tensor(s["ids"])]), len(PROMPTS[p]) - 1)
        for (p, _), s in got.items()
    ]
    forced = loop.run(hf.score(items, ScoreParams(signal=Signal.TARGET_ONLY, temperature=0.7)))
    for s, f in zip(got.values(), forced, strict=True):
        assert _max_diff(torch.cat(s["lp"]), f.target_logprob, "generate TP1 sampled logprobs T=0.7") <= TOL


def test_generate_stops_on_stop_token_ids(loop, gen):
    greedy = _samples(loop.collect(gen.generate(PROMPTS[:1], GenerateParams(max_new_tokens=8, greedy=True))))
    stop = greedy[(0, 0)]["ids"][2]
    first = greedy[(0, 0)]["ids"].index(stop)
    params = GenerateParams(max_new_tokens=8, greedy=True, stop_token_ids=(stop,))
    s = _samples(loop.collect(gen.generate(PROMPTS[:1], params)))[(0, 0)]
    assert s["ids"] == greedy[(0, 0)]["ids"][: first + 1] and s["fin"] == ["stop"]


def test_text_prompts_use_the_model_folders_tokenizer(gen, hf):
    """Generate's text prompts are tokenized by the servicer with the backend's tokenizer (teacher_server/
    text.py): the vLLM backend loads the folder's, as hf does (its engines skip their own)."""
    from teacher_server.text import TextCodec

    text = "def main():\n    return 1"
    ids = TextCodec(gen.tokenizer).encode(text)
    assert len(ids) > 1 and ids == TextCodec(hf.tokenizer).encode(text)


def test_generate_refuses_inexact_combinations(loop, gen, pool):
    with pytest.raises(UnsupportedSignal, match="greedy with temperature"):
        loop.collect(gen.generate(PROMPTS, GenerateParams(greedy=True, temperature=0.5)))
    with pytest.raises(UnsupportedSignal, match="top_p"):
        loop.collect(gen.generate(PROMPTS, GenerateParams(top_p=0.9)))
    with pytest.raises(UnsupportedSignal, match="top_k 5: vLLM reports"):
        loop.collect(gen.generate(PROMPTS, GenerateParams(top_k=5)))
    with pytest.raises(UnsupportedSignal, match="runner generate"):
        loop.collect(pool.generate(PROMPTS, GenerateParams(max_new_tokens=2)))


# ------------------------------------------------------------------- real server: TP=2, SIGTERM clean


def test_server_tp2_parity_and_clean_sigterm(loop, hf, sharp_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    from teacher_server.client import TeacherClient

    args = [
        "--model",
        str(sharp_dir),
        "--backend",
        "vllm",
        "--tensor-parallel-size",
        "2",
        "--max-top-k",
        "512",
    ]
    args += ["--vllm.runner", "both", "--vllm.kv-cache-memory-bytes", str(KV_BYTES), "--vllm.enforce-eager"]
    teacher = LocalTeacher(args, log_path=tmp_path / "teacher.log", env={"VLLM_CPU_OMP_THREADS_BIND": ""})
    teacher.start()
    try:
        items = _items()
        with TeacherClient([teacher.address], timeout_s=120) as client:
            info = client.info()
            assert (info.backend, info.tensor_parallel_size) == ("vllm", 2)
            seqs = [it.token_ids for it in items]
            froms = [it.score_from for it in items]
            got = client.score(seqs, score_from=froms, top_k=64, temperature=2.0)
            want = loop.run(hf.score(items, ScoreParams(signal=Signal.TOP_K, top_k=64, temperature=2.0)))
            for g, w, full in zip(got, want, _ref_full(loop, hf, items, 2.0), strict=True):
                assert_topk_equal(g.ids, w.ids, full)
                for name in ("logprobs", "tail_logprob", "target_logprob"):
                    assert _max_diff(getattr(g, name), getattr(w, name), f"server TP2 T=2 {name}") <= TOL
            samples = client.generate([p.tolist() for p in PROMPTS], max_new_tokens=8, greedy=True)
        ref = _samples(loop.collect(hf.generate(PROMPTS, GenerateParams(max_new_tokens=8, greedy=True))))
        assert [s[0].token_ids.tolist() for s in samples] == [ref[(p, 0)]["ids"] for p in range(len(PROMPTS))]

        children = psutil.Process(teacher.proc.pid).children(recursive=True)
        assert len(children) >= 6, "2 engine cores + 2×2 TP workers expected"
        teacher.proc.send_signal(signal.SIGTERM)
        assert teacher.proc.wait(120) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(psutil, c) for c in children):
            time.sleep(0.2)
        left = [c.pid for c in children if _alive(psutil, c)]
        assert not left, f"orphan processes after SIGTERM: {left}"
    finally:
        teacher.stop()


def _alive(psutil, proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
