"""The transformers backend: one HF causal LM on one device (cpu, cuda, cuda:N), every signal, sampling.

    backend = HFBackend(ServeConfig(model="default"))   # or an HF folder, or a path to a .gguf file
    await backend.start()                                # loads + warms up; `backend.info` is valid after it
    scores = await backend.score(items, ScoreParams(signal=Signal.TOP_K, top_k=64))

All model work runs on ONE dedicated worker thread (the model is not re-entrant), so score and generate
calls never overlap on the model and never block the event loop. Scoring sorts sequences by length and
runs sub-batches whose padded size (B × max_len) stays within `max_batch_tokens` (a longer sequence runs
alone). The output layer is applied only to the returned rows, from the base model's final (post-norm)
hidden state, which is also the HIDDEN signal. Handled output-layer extras: Cohere `logit_scale`, Granite
`logits_scaling`, Gemma `final_logit_softcapping`; a HIDDEN client must apply them itself.
Returned tensors are CPU inference tensors (`torch.inference_mode`): clone them before autograd use.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from asymkd.contract import GenerateChunk, SequenceScores, Signal, TeacherInfo
from teacher_server import scoring
from teacher_server.backends.base import BackendError, GenerateParams, ScoreItem, ScoreParams, TeacherBackend
from teacher_server.backends.common import (
    TORCH_DTYPES,
    LogitExtras,
    eos_token_ids,
    load_tokenizer,
    tokenizer_facts,
)
from teacher_server.config import ServeConfig

log = logging.getLogger("asymkd.teacher.hf")

_DONE = object()  # end-of-stream marker on a generate queue


def length_buckets(lengths: list[int], max_tokens: int, per_item: int = 1) -> list[list[int]]:
    """Group indices, sorted by length, so that len(group) × per_item × max(length) <= max_tokens.

    An item that alone exceeds the budget gets a group of its own.
    """
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        if groups and (len(groups[-1]) + 1) * per_item * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def top_k_filter(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) probs -> (B, V) renormalized over the k most likely tokens of each row (ties at the k-th kept)."""
    if k <= 0 or k >= probs.shape[-1]:
        return probs
    kth = torch.topk(probs, k, dim=-1).values[:, -1:]
    kept = probs.masked_fill(probs < kth, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) probs -> (B, V) with everything outside the smallest top-p set zeroed (at least one kept)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) > top_p] = 0.0  # mass before the token already exceeds p
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


@dataclass
class _Decode:
    """Live state of one generation sub-batch of B rows (finished rows are dropped as they finish)."""

    cache: object  # transformers Cache
    logits: torch.Tensor  # (B, V) next-token logits
    mask: torch.Tensor  # (B, T) attention mask over the cache + current token
    next_pos: torch.Tensor  # (B,) position id of the next token fed
    rows: list[tuple[int, int]]  # (prompt_index, sample_index) per row
    limits: list[int]  # max new tokens per row


@dataclass
class _GenRun:
    """One generate call as the worker sees it."""

    params: GenerateParams
    gen: torch.Generator
    stop_ids: set[int]
    emit: Callable[[object], None]  # hands a list of chunks / _DONE / an exception to the event loop
    stop: threading.Event  # set when the consumer went away


class HFBackend(TeacherBackend):
    """A transformers AutoModelForCausalLM teacher. `info` is available after `await start()`."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = TORCH_DTYPES[cfg.dtype]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-teacher")
        self._seeds = torch.Generator().manual_seed(cfg.seed)  # server-chosen seeds (worker thread only)
        self._active: set[threading.Event] = set()
        self.decode_steps = 0  # generation steps run so far, all calls (a cancelled call stops adding to it)
        self._info: TeacherInfo | None = None
        self.model = None

    @property
    def info(self) -> TeacherInfo:
        if self._info is None:
            raise RuntimeError("HFBackend.info is available after `await start()`")
        return self._info

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model on the worker thread, then warm up (one tiny score + generate) if cfg.warmup."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        if self.cfg.warmup:
            ids = torch.tensor([0, 1, 2, 3], dtype=torch.long) % self._info.vocab_size
            await self.score([ScoreItem(ids)], ScoreParams(signal=Signal.TOP_K, top_k=1))
            async for _ in self.generate([ids], GenerateParams(max_new_tokens=2, greedy=True)):
                pass
        log.info("hf backend ready: %s on %s (%s)", self._info.model, self.device, self._info.dtype)

    async def close(self) -> None:
        """Stop running generations, shut the worker thread down, free the model."""
        for stop in list(self._active):
            stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.model = self._decoder = self._head = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _resolve_source(self) -> tuple[Path, str | None, str]:
        """cfg.model -> (folder, gguf file name or None, display name)."""
        if self.cfg.model == "default":
            from teacher_server.models import DEFAULT_TEACHER, default_teacher_dir

            return default_teacher_dir(), None, DEFAULT_TEACHER
        path = Path(self.cfg.model).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"model: GGUF file {path} does not exist")
            return path.parent, path.name, self.cfg.model
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: {path} is not an HF model folder (no config.json)")
        return path, None, self.cfg.model

    def _load(self) -> None:
        """Load model + tokenizer (worker thread) and fill `info`."""
        from transformers import AutoModelForCausalLM

        folder, gguf, name = self._resolve_source()
        log.info("loading %s (%s%s) on %s", name, folder, f"/{gguf}" if gguf else "", self.device)
        kwargs = {"dtype": self.dtype, "attn_implementation": "sdpa"}
        if gguf:
            kwargs["gguf_file"] = gguf
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(self.device).eval()
        self.model = model
        self._decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self._head = model.get_output_embeddings()
        text_cfg = model.config.get_text_config()
        self._extras = LogitExtras.from_config(text_cfg)
        self.tokenizer = load_tokenizer(folder, gguf)
        tok_len, tok_hash = tokenizer_facts(folder, gguf, self.tokenizer)
        vocab_size, hidden_size = self._head.weight.shape
        self._info = TeacherInfo(
            model=name,
            backend="hf",
            vocab_size=int(vocab_size),
            hidden_size=int(hidden_size),
            max_seq_len=self.cfg.max_seq_len or int(text_cfg.max_position_embeddings),
            max_top_k=min(self.cfg.max_top_k, int(vocab_size)),
            tokenizer_hash=tok_hash,
            dtype=self.cfg.dtype,
            signals=tuple(Signal),
            eos_token_ids=eos_token_ids([getattr(model, "generation_config", None), text_cfg]),
            tokenizer_vocab_size=tok_len or int(vocab_size),
        )

    # ---- scoring ---------------------------------------------------------------------------------------

    async def score(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        """One SequenceScores per item, in order; runs on the worker thread."""
        self.info  # noqa: B018  (raises before start)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._score_sync, items, params)

    def _score_sync(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        results: list[SequenceScores | None] = [None] * len(items)
        base_seed = params.seed or self._fresh_seed()
        lengths = [it.token_ids.numel() for it in items]
        with torch.inference_mode():
            for group in length_buckets(lengths, self.cfg.max_batch_tokens):
                hidden_rows = self._forward_rows([items[i] for i in group])
                for i, h in zip(group, hidden_rows, strict=True):
                    sampled = params.signal == Signal.SAMPLED
                    gen = scoring.item_generator(items[i], base_seed) if sampled else None
                    results[i] = scoring.scores_from_hidden(h, items[i], params, self._logits, gen)
        return results

    def _forward_rows(self, items: list[ScoreItem]) -> list[torch.Tensor]:
        """Right-padded forward of B items -> per item its (R_i, H) final hidden rows score_from..L-2."""
        ids, mask = self._pad([it.token_ids for it in items], left=False)
        out = self._decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        return [hidden[b, it.score_from : it.token_ids.numel() - 1] for b, it in enumerate(items)]

    def _pad(self, seqs: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """B 1-D id tensors -> ids (B, T) padded with 0 and attention mask (B, T), on the device."""
        max_len = max(s.numel() for s in seqs)
        ids = torch.zeros(len(seqs), max_len, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_len, dtype=torch.long)
        for b, s in enumerate(seqs):
            cols = slice(max_len - s.numel(), None) if left else slice(0, s.numel())
            ids[b, cols], mask[b, cols] = s, 1
        return ids.to(self.device), mask.to(self.device)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden rows -> (N, V) logits, with the model's logit scaling/softcapping if any."""
        return self._extras.apply(self._head(hidden))

    def _fresh_seed(self) -> int:
        return int(torch.randint(1, 2**62, (1,), generator=self._seeds))

    # ---- generation ------------------------------------------------------------------------------------

    async def generate(
        self, prompts: list[torch.Tensor], params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        """Stream chunks (one per decode step per unfinished sample) from the worker thread.

        Closing/cancelling the iterator makes the worker stop at its next decode step.
        """
        self.info  # noqa: B018  (raises before start)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                stop.set()

        self._active.add(stop)
        fut = loop.run_in_executor(self._executor, self._generate_worker, prompts, params, emit, stop)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                for chunk in item:
                    yield chunk
        finally:
            stop.set()
            self._active.discard(stop)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"

    def _generate_worker(self, prompts: list[torch.Tensor], params: GenerateParams, emit, stop) -> None:
        """Worker-thread body of one generate call: results and errors go to `emit`, then _DONE."""
        try:
            seed = params.seed if params.seed is not None else self._fresh_seed()
            run = _GenRun(
                params=params,
                gen=torch.Generator(device=self.device).manual_seed(seed),
                stop_ids=set(params.stop_token_ids or self.info.eos_token_ids),
                emit=emit,
                stop=stop,
            )
            with torch.inference_mode():
                self._generate_sync(prompts, run)
            if stop.is_set():  # close() (or a gone consumer): never end a stream silently unfinished
                raise BackendError("generation stopped: the backend is closing")
            emit(_DONE)
        except Exception as e:  # handed to the consumer, which re-raises it
            emit(e)

    def _generate_sync(self, prompts: list[torch.Tensor], run: _GenRun) -> None:
        """Prompt sub-batches within the token budget (prompt + new tokens, × n), decoded one after another."""
        n = run.params.n
        # the last generated token is never fed, so a sequence may reach max_seq_len + 1 tokens
        limits = [min(run.params.max_new_tokens, self.info.max_seq_len - p.numel() + 1) for p in prompts]
        costs = [p.numel() + lim for p, lim in zip(prompts, limits, strict=True)]
        for group in length_buckets(costs, self.cfg.max_batch_tokens, per_item=n):
            if run.stop.is_set():
                return
            self._decode(
                self._prefill([prompts[i] for i in group], group, [limits[i] for i in group], n), run
            )

    def _prefill(self, prompts: list[torch.Tensor], index: list[int], limits: list[int], n: int) -> _Decode:
        """Left-padded prefill of P prompts, then each row repeated n times (rows = P × n, prompt-major)."""
        ids, mask = self._pad(prompts, left=True)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        return _Decode(
            cache=cache,
            logits=self._logits(out.last_hidden_state[:, -1]).repeat_interleave(n, 0),
            mask=mask.repeat_interleave(n, 0),
            next_pos=mask.sum(-1).repeat_interleave(n, 0),
            rows=[(p, s) for p in index for s in range(n)],
            limits=[lim for lim in limits for _ in range(n)],
        )

    def _decode(self, st: _Decode, run: _GenRun) -> None:
        """Sample, emit and feed one token per step until every row of `st` has finished (or stop is set)."""
        params = run.params
        for step in range(max(st.limits)):
            if run.stop.is_set():  # the consumer went away (client cancelled): free the worker now
                return
            self.decode_steps += 1
            lp = scoring.log_softmax_at_temperature(st.logits, params.temperature or 1.0)  # (B, V) fp32
            if params.greedy:
                tok = st.logits.argmax(-1)
            else:
                probs = top_k_filter(lp.exp(), params.top_k)
                probs = probs if params.top_p >= 1.0 else nucleus_filter(probs, params.top_p)
                tok = torch.multinomial(probs, 1, generator=run.gen)[:, 0]
            toks = tok.tolist()
            done = [t in run.stop_ids or step + 1 >= lim for t, lim in zip(toks, st.limits, strict=True)]
            run.emit(_step_chunks(st, run, lp, tok, done))
            keep = [i for i, d in enumerate(done) if not d]
            if not keep:
                return
            if len(keep) < len(done):  # drop finished rows from the batch and the KV cache
                idx = torch.tensor(keep, device=self.device)
                st.cache.batch_select_indices(idx)
                st.mask, st.next_pos, tok = st.mask[idx], st.next_pos[idx], tok[idx]
                st.rows, st.limits = [st.rows[i] for i in keep], [st.limits[i] for i in keep]
            st.mask = torch.cat([st.mask, st.mask.new_ones(len(keep), 1)], dim=1)
            out = self._decoder(
                input_ids=tok[:, None],
                attention_mask=st.mask,
                position_ids=st.next_pos[:, None],
                past_key_values=st.cache,
                use_cache=True,
            )
            st.next_pos = st.next_pos + 1
            st.logits = self._logits(out.last_hidden_state[:, -1])


def _step_chunks(
    st: _Decode, run: _GenRun, lp: torch.Tensor, tok: torch.Tensor, done: list[bool]
) -> list[GenerateChunk]:
    """One chunk per live row for this step: its token, logprob (1,) and optional top-k ids/logprobs (1, k)."""
    vd, k = run.params.value_dtype, min(run.params.top_k_logprobs, lp.shape[-1])
    tok_lp = lp.gather(-1, tok[:, None]).to(vd).cpu()  # (B, 1)
    top_ids = top_lp = None
    if k > 0:
        top_lp, top_ids = torch.topk(lp, k, dim=-1)
        top_lp, top_ids = top_lp.to(vd).cpu(), top_ids.to(torch.int32).cpu()
    chunks = []
    for r, (t, fin) in enumerate(zip(tok.tolist(), done, strict=True)):
        chunks.append(
            GenerateChunk(
                prompt_index=st.rows[r][0],
                sample_index=st.rows[r][1],
                token_ids=[t],
                logprobs=tok_lp[r],
                top_ids=None if top_ids is None else top_ids[r : r + 1],
                top_logprobs=None if top_lp is None else top_lp[r : r + 1],
                finished=fin,
                finish_reason=("stop" if t in run.stop_ids else "length") if fin else "",
            )
        )
    return chunks
