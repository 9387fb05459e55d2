"""The teacher feed: a background thread per rank keeps up to `prefetch` batches in flight to the teacher.

    feed = TeacherFeed(batches, cfg.teacher, cfg.distill, rank=rank, vocab_size=V, tokenizer_hash=h)
    for fed in feed:            # FedBatch, in data order, exactly one per batch
        step(fed.batch, fed.teacher)      # teacher rows aligned with logits[:, :-1]; mask with .valid
    feed.close()

The thread runs an asyncio loop with one `AsyncTeacherClient`. Each batch read becomes one task that sends
it on a `ScoreStream` call (large FULL answers arrive in chunks; the client balances calls over the replicas
and fails over); up to `prefetch` batches are in flight, so while the training loop works on batch i, batches
i+1..i+prefetch are being scored. Backpressure: a batch is read from the data iterator only when one of
`prefetch` slots is free, and a slot frees when the training loop takes a result. (One call per batch, rather
than one long stream whose source blocks on backpressure, keeps the client's per-request deadline honest: a
slow training step never counts as teacher time.)

Exactly once: every batch read gets an index; its task keeps it until it has an answer; answers are handed
over in index order. When the client gives up with a retryable status (UNAVAILABLE, transient
RESOURCE_EXHAUSTED: e.g. the only teacher is restarting), the whole batch is sent again, never skipped:
meanwhile the feed backs off, opens a fresh client (new channels, no stale reconnect backoff) and repeats the
GetInfo handshake, until no answer has come for `teacher.retry_deadline_s`. Any other error (bad request,
incompatible teacher, deadline) is raised in the training thread, gRPC status and details included.

Vocabulary handshake (`negotiate`; inprocess_teacher.py runs the same one on an in-process teacher): the
teacher's tokenizer hash must equal the student's and its logits width (`vocab_size`) must equal the
student's. Padded-vocab rule (`teacher.allow_padded_vocab`): widths may differ when both cover every id the
tokenizer can produce (`TeacherInfo.tokenizer_vocab_size`), as with Qwen checkpoints padded to 151936 or
152064 columns. Ids that exist on one side only are ids the tokenizer never produces; they count as
probability 0 on the other side. Student wider (V_s > V_t): the losses put its extra columns in the tail
bucket (TOP_K) or give the teacher -inf there (FULL). Teacher wider (V_t > V_s): the feed asks for top_k +
(V_t − V_s) ids (capped at max_top_k), keeps the first top_k real ones and folds the rest, padded ids
included, into tail_logprob (the K+1 classes still hold all the mass); FULL rows are cut to V_s and
renormalized.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
import torch
from torch import Tensor

from student_trainer.config import DistillSection, TeacherSection
from teacher_server.backends.base import Signal
from teacher_server.client import (
    AsyncTeacherClient,
    ScoreQuery,
    SequenceScores,
    TeacherError,
    backoff_s,
)

log = logging.getLogger("asymkd.student.feed")
_END = object()


class TeacherCompatError(ValueError):
    """Teacher and student disagree on the vocabulary (or the teacher cannot give the requested signal)."""


@dataclass
class TeacherBatch:
    """Teacher answers for one batch, rows aligned with logits[:, :-1] (row t predicts input_ids[:, t+1]).

    TOP_K: ids (B, T-1, k) int64, logprobs (B, T-1, k) float32 (descending), tail_logprob (B, T-1) = log of
    the mass outside the top-k. target_logprob (B, T-1). FULL: full (B, T-1, V) log-probs. valid (B, T-1)
    bool: rows the teacher scored; other rows hold a placeholder (uniform over ids 0..k-1): mask them out."""

    valid: Tensor
    ids: Tensor | None = None
    logprobs: Tensor | None = None
    tail_logprob: Tensor | None = None
    target_logprob: Tensor | None = None
    full: Tensor | None = None


@dataclass
class FedBatch:
    """One data batch with its teacher answer; wait_ms = how long the training loop waited for it."""

    batch: dict
    teacher: TeacherBatch
    wait_ms: float
    index: int = -1  # position in the data iterator (0, 1, 2, ...)


# ---------------------------------------------------------------------------------------------- handshake
def check_teacher_compat(info, *, vocab_size: int, tokenizer_hash: str, allow_padded_vocab: bool) -> None:
    """Raise TeacherCompatError unless teacher (`TeacherInfo`) and student agree (see the module docstring)."""
    where = f"teacher {info.model!r} ({info.backend})"
    if info.tokenizer_hash != tokenizer_hash:
        raise TeacherCompatError(
            f"{where} has tokenizer hash {info.tokenizer_hash or '(none)'!r} but the student's is "
            f"{tokenizer_hash or '(none)'!r}: token-level KD needs the same tokenizer on both sides"
        )
    if info.vocab_size == vocab_size:
        return
    sizes = f"teacher vocab_size (logits width) {info.vocab_size} != student vocab_size {vocab_size}"
    tok = info.tokenizer_vocab_size
    covered = tok > 0 and min(info.vocab_size, vocab_size) >= tok
    if not allow_padded_vocab:
        hint = f"; both cover the tokenizer's {tok} ids: set teacher.allow_padded_vocab=true to accept it"
        raise TeacherCompatError(sizes + (hint if covered else ""))
    if not covered:
        raise TeacherCompatError(
            f"{sizes}, and the padded-vocab rule needs both to cover the tokenizer's ids "
            f"(tokenizer_vocab_size={tok or 'unknown'})"
        )


def requested_top_k(distill: DistillSection, info, vocab_size: int) -> int:
    """top_k, plus room for the teacher's padded ids when its vocab is wider (capped at max_top_k)."""
    k = distill.top_k
    if k > info.max_top_k:
        raise TeacherCompatError(f"distill.top_k={k} exceeds the teacher's max_top_k={info.max_top_k}")
    return min(k + max(info.vocab_size - vocab_size, 0), info.max_top_k)


def negotiate(
    info, distill: DistillSection, teacher: TeacherSection, *, vocab_size: int, tokenizer_hash: str
) -> int:
    """The handshake on a teacher's facts (`TeacherInfo` from GetInfo, or an in-process backend's
    `BackendInfo`): same vocabulary, the wanted signal on offer; returns the top_k to request."""
    check_teacher_compat(
        info,
        vocab_size=vocab_size,
        tokenizer_hash=tokenizer_hash,
        allow_padded_vocab=teacher.allow_padded_vocab,
    )
    wanted = Signal.TOP_K if distill.signal == "top_k" else Signal.FULL
    if info.signals and wanted not in info.signals:
        raise TeacherCompatError(f"teacher {info.model!r} does not offer signal {wanted.name}")
    return requested_top_k(distill, info, vocab_size)


# ------------------------------------------------------------------------------------------ batch <-> rows
def score_from_rows(loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T-1) loss mask -> (score_from (B,), has_target (B,)): the first target row of each packed row, so
    the teacher skips prompts; a row without targets gets T-2 (one row, result ignored)."""
    has_target = loss_mask.any(dim=1)
    first = loss_mask.to(torch.int8).argmax(dim=1)
    return torch.where(has_target, first, loss_mask.shape[1] - 1), has_target


def build_query(batch: dict, distill: DistillSection, top_k: int) -> ScoreQuery:
    score_from, _ = score_from_rows(batch["loss_mask"])
    return ScoreQuery(
        seqs=list(batch["input_ids"]),
        score_from=score_from.tolist(),
        signal=distill.signal,
        top_k=top_k,
        temperature=distill.temperature,
    )


def fit_teacher_vocab(s: SequenceScores, vocab_size: int, top_k: int) -> SequenceScores:
    """Drop teacher ids >= vocab_size (a wider, padded teacher vocab; see the module docstring)."""
    if s.full is not None and s.full.shape[-1] > vocab_size:
        s.full = torch.log_softmax(s.full[:, :vocab_size].float(), dim=-1)
    if s.ids is None or (s.ids.shape[1] == top_k and bool((s.ids < vocab_size).all())):
        return s
    real = s.ids < vocab_size
    keep = real & (real.cumsum(dim=1) <= top_k)
    short = keep.sum(dim=1) < top_k
    if bool(short.any()):
        raise TeacherCompatError(
            f"a teacher top-{s.ids.shape[1]} row holds fewer than {top_k} ids below the student's vocab_size "
            f"{vocab_size}; raise the teacher's --max-top-k or build the student with the teacher's vocab size"
        )
    rows = s.ids.shape[0]
    dropped = s.logprobs.masked_fill(keep, float("-inf"))
    tail = torch.cat([s.tail_logprob.unsqueeze(1), dropped], dim=1).logsumexp(dim=1)
    s.ids, s.logprobs = s.ids[keep].view(rows, top_k), s.logprobs[keep].view(rows, top_k)
    s.tail_logprob = tail
    return s


def scatter_scores(
    scores: list[SequenceScores], loss_mask: Tensor, *, top_k: int, vocab_size: int
) -> TeacherBatch:
    """Per-sequence results (rows score_from..T-2) -> (B, T-1, ·) tensors + valid."""
    b, rows = loss_mask.shape
    score_from, has_target = score_from_rows(loss_mask)
    fits = [fit_teacher_vocab(s, vocab_size, top_k) for s in scores]
    out = TeacherBatch(valid=torch.zeros(b, rows, dtype=torch.bool))
    first = fits[0]
    if first.ids is not None:
        out.ids = torch.arange(top_k, dtype=torch.int64).expand(b, rows, top_k).clone()
        out.logprobs = torch.full((b, rows, top_k), -math.log(top_k))
        out.tail_logprob = torch.full((b, rows), float("-inf"))
    if first.full is not None:
        out.full = torch.full((b, rows, first.full.shape[-1]), float("-inf"))
        out.full[..., 0] = 0.0
    if first.target_logprob is not None:
        out.target_logprob = torch.zeros(b, rows)
    for i, s in enumerate(fits):
        if not has_target[i]:
            continue
        start = int(score_from[i])
        if s.num_rows != rows - start:
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS,
                f"sequence {i}: {s.num_rows} teacher rows for {rows - start} requested",
            )
        out.valid[i, start:] = True
        for name in ("ids", "logprobs", "tail_logprob", "target_logprob", "full"):
            dst, src = getattr(out, name), getattr(s, name)
            if dst is not None and src is not None:
                dst[i, start:] = src
    return out


# ---------------------------------------------------------------------------------------------------- feed
class TeacherFeed:
    """Iterate for FedBatch items (see the module docstring). `client_factory(targets, **options)` returns
    an AsyncTeacherClient-like object; tests of the feed's logic pass a stand-in."""

    def __init__(
        self,
        batches: Iterable[dict],
        teacher: TeacherSection,
        distill: DistillSection,
        *,
        rank: int = 0,
        vocab_size: int,
        tokenizer_hash: str,
        backoff_base_s: float = 0.25,
        client_factory: Callable[..., AsyncTeacherClient] | None = None,
    ) -> None:
        if not teacher.targets:
            raise ValueError("teacher.targets is empty: the feed needs at least one teacher address")
        self._data = iter(batches)
        self.teacher, self.distill, self.rank = teacher, distill, rank
        self.vocab_size, self.tokenizer_hash = vocab_size, tokenizer_hash
        self.retry_deadline_s = teacher.retry_deadline_s
        self._factory = client_factory or AsyncTeacherClient
        self._backoff_base_s = backoff_base_s
        # Each rank starts on a different replica; the client balances from there.
        shift = rank % len(teacher.targets)
        self._targets = list(teacher.targets[shift:]) + list(teacher.targets[:shift])
        self._out: queue.Queue = queue.Queue()  # FedBatch | _END | BaseException, in order
        self._ready: dict[int, FedBatch] = {}  # answered, waiting for earlier batches (feed thread only)
        self._read = self._delivered = self._taken = 0
        self.resends = 0  # batches sent again after a teacher failure
        self._client, self._gen = None, 0  # the current client and its generation (+1 per reconnect)
        self._outage_since: float | None = None  # first failure since the last answer
        self._attempt = 0
        self.top_k = distill.top_k
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._lock: asyncio.Lock | None = None
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._thread_main, name=f"teacher-feed-r{rank}", daemon=True)
        self._thread.start()
        self.info = self._started.result()  # the handshake: errors raise here, at start

    # ------------------------------------------------------------------------------- training thread side
    @property
    def depth(self) -> int:
        """Teacher results ready and waiting for the training loop (0 = the loop waits on the teacher)."""
        return self._delivered - self._taken

    @property
    def in_flight(self) -> int:
        return self._read - self._delivered

    def __iter__(self) -> Iterator[FedBatch]:
        while True:
            t0 = time.perf_counter()
            item = self._next_item()
            wait_ms = (time.perf_counter() - t0) * 1e3
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if item.index != self._taken:  # cannot happen; guards the exactly-once contract
                raise RuntimeError(f"teacher feed delivered batch {item.index}, expected {self._taken}")
            self._taken += 1
            self._free_slot()
            item.wait_ms = wait_ms
            yield item

    def _next_item(self):
        while True:
            try:
                return self._out.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._out.empty():
                    return RuntimeError("the teacher feed thread stopped without a result")

    def _free_slot(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                loop.call_soon_threadsafe(self._slots.release)

    def close(self) -> None:
        """Stop the feed thread (batches still in flight are dropped)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=30.0)

    def __enter__(self) -> TeacherFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- feed thread side
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
            self._out.put(_END)
        except asyncio.CancelledError:
            self._out.put(_END)
        except BaseException as e:
            if not self._started.done():
                self._started.set_exception(e)
            self._out.put(e)

    async def _main(self) -> None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        self._slots, self._lock = asyncio.Semaphore(self.teacher.prefetch), asyncio.Lock()
        try:
            await self._reconnect(None, 0)  # the handshake; retried while the teacher is not up yet
            async with asyncio.TaskGroup() as group:
                while (item := await self._read_next()) is not None:
                    group.create_task(self._score(*item))
        except BaseExceptionGroup as group_error:  # the first failing batch's error, not the group
            raise group_error.exceptions[0] from None
        finally:
            if self._client is not None:
                await self._client.close()

    async def _read_next(self) -> tuple[int, dict, ScoreQuery] | None:
        """The next data batch once a slot is free (backpressure); None at the end of the data."""
        await self._slots.acquire()
        batch = await asyncio.to_thread(next, self._data, _END)
        if batch is _END:
            return None
        index, self._read = self._read, self._read + 1
        return index, batch, build_query(batch, self.distill, self.top_k)

    async def _score(self, index: int, batch: dict, query: ScoreQuery) -> None:
        """Score one batch until it has its answer: after a retryable failure the whole batch is sent again
        (its partial answer, if any, is dropped), so it is answered exactly once."""
        while True:
            client, gen = self._client, self._gen
            try:
                stream = client.score_stream([query], max_in_flight=1, ordered=True)
                (scores,) = [s async for s in stream]
            except Exception as e:
                stale = gen != self._gen  # its client was replaced (and closed) under this call
                if not stale and not (isinstance(e, TeacherError) and e.retryable):
                    raise
                self.resends += 1
                if not stale:
                    await self._reconnect(e, gen)
                continue
            self._outage_since = None
            top_k, vocab = self.distill.top_k, self.vocab_size
            teacher = scatter_scores(scores, batch["loss_mask"], top_k=top_k, vocab_size=vocab)
            self._ready[index] = FedBatch(batch, teacher, 0.0, index)
            while self._delivered in self._ready:  # hand over in data order
                self._out.put(self._ready.pop(self._delivered))
                self._delivered += 1
            return

    async def _reconnect(self, err: TeacherError | None, gen: int) -> None:
        """Replace client generation `gen` by a fresh client (new channels: no stale reconnect backoff) that
        passed the handshake; back off between tries; give up after retry_deadline_s without an answer."""
        async with self._lock:
            while self._gen == gen:  # else another batch's task reconnected already
                if err is not None:
                    await self._back_off(err)
                client = self._factory(
                    self._targets, timeout_s=self.teacher.timeout_s, max_retries=self.teacher.max_retries
                )
                try:
                    await self._handshake(client)
                except TeacherError as e:
                    await client.close()
                    if not e.retryable:
                        raise
                    err = e
                    continue
                except BaseException:
                    await client.close()
                    raise
                old, self._client, self._gen = self._client, client, gen + 1
                if old is not None:
                    await old.close()  # calls still on it fail and retry on the new client

    async def _back_off(self, err: TeacherError) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since, self._attempt = now, 0
        down_s = now - self._outage_since
        if down_s > self.retry_deadline_s:
            msg = f"{err.details} (no teacher answer for {down_s:.0f} s)"
            raise TeacherError(err.code, msg, err.address, err.method) from err
        self._attempt += 1
        delay = backoff_s(self._attempt, self._backoff_base_s, 5.0)
        log.warning(
            "teacher unavailable (%s: %s); %d batches to resend; next try in %.1f s (down %.0f s)",
            err.code.name, err.details[:200], self.in_flight, delay, down_s,
        )  # fmt: skip
        await asyncio.sleep(delay)

    async def _handshake(self, client) -> None:
        info = await client.info()
        self.top_k = negotiate(
            info, self.distill, self.teacher, vocab_size=self.vocab_size, tokenizer_hash=self.tokenizer_hash
        )
        if not self._started.done():
            log.info(
                "teacher %s (%s, vocab %d) at %s | signal %s top_k %d T %.2f | prefetch %d",
                info.model, info.backend, info.vocab_size, ",".join(self._targets), self.distill.signal,
                self.distill.top_k, self.distill.temperature, self.teacher.prefetch,
            )  # fmt: skip
            self._started.set_result(info)
