"""Micro-batcher: coalesces concurrent Score requests into one engine call per batch.

Requests with equal ScoreParams (the batch key) are packed, oldest first, under a token budget
(`max_batch_tokens`, the sum of sequence lengths) once the oldest has waited `max_wait_ms` or the budget is
full; a request larger than the budget runs alone. The queue is bounded (`max_queue_requests`, and
optionally `max_queue_tokens`): beyond it `submit` fails at once with RESOURCE_EXHAUSTED, so memory stays
bounded under overload. A cancelled request (client gone) leaves the queue without disturbing others; an
engine error fails only the requests of that batch.

    batcher = MicroBatcher(backend, max_batch_tokens=8192, max_wait_ms=5, max_queue_requests=256)
    await batcher.start()
    scores = await batcher.submit(items, params)       # list[SequenceScores], one per item, in order
    await batcher.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from asymkd.contract import SequenceScores
from teacher_server.backends.base import BackendError, ScoreItem, ScoreParams, TeacherBackend
from teacher_server.validation import RequestError

log = logging.getLogger("asymkd.teacher.batching")


@dataclass(eq=False)
class _Pending:
    items: list[ScoreItem]
    params: ScoreParams
    tokens: int
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the batcher did; read by tests and exported as metrics."""

    batches: int = 0
    requests: int = 0
    sequences: int = 0
    tokens: int = 0


class MicroBatcher:
    """An asyncio micro-batcher in front of one TeacherBackend (see the module docstring)."""

    def __init__(
        self,
        backend: TeacherBackend,
        *,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue_requests: int,
        max_queue_tokens: int = 0,
        max_inflight_batches: int = 1,
        on_batch: Callable[[int, int, int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ):
        self.backend = backend
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_requests = max_queue_requests
        self.max_queue_tokens = max_queue_tokens
        self._on_batch = on_batch  # (requests, sequences, tokens) per engine call
        self._on_queue_depth = on_queue_depth
        self._queue: list[_Pending] = []  # FIFO of waiting (not yet dispatched) requests
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight_batches)
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (dispatched ones are not counted)."""
        return len(self._queue)

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._schedule(), name="micro-batcher")

    async def close(self) -> None:
        """Stop scheduling; waiting requests fail with UNAVAILABLE, running batches finish first."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(
                    RequestError(grpc.StatusCode.UNAVAILABLE, "", "teacher is shutting down; retry elsewhere")
                )
        self._queue.clear()
        self._queued_tokens = 0
        self._depth_changed()

    async def submit(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        """Queue `items` for scoring and wait for their results (one SequenceScores per item, in order)."""
        if self._loop_task is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "teacher is not ready (batcher not started)")
        tokens = sum(int(it.token_ids.numel()) for it in items)
        self._check_room(tokens)
        pending = _Pending(items, params, tokens, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_tokens += tokens
        self._depth_changed()
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            # Client gone: leave the queue if still waiting; a dispatched batch runs on for the others.
            self._remove(pending)
            raise

    def _check_room(self, tokens: int) -> None:
        n = len(self._queue)
        full = n >= self.max_queue_requests
        if self.max_queue_tokens and n and self._queued_tokens + tokens > self.max_queue_tokens:
            full = True
        if full:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
                f"teacher queue full ({n} requests, {self._queued_tokens} tokens waiting); retry with backoff",
            )

    def _remove(self, pending: _Pending) -> None:
        if pending in self._queue:
            self._queue.remove(pending)
            self._queued_tokens -= pending.tokens
            self._depth_changed()

    def _depth_changed(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._queue))

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        """Wait until the oldest request's batch is due (budget full or max wait over), then take it."""
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._queue[0]
            same = [p for p in self._queue if p.params == head.params]
            due_in = head.enqueued_at + self.max_wait_s - time.monotonic()
            if sum(p.tokens for p in same) >= self.max_batch_tokens or due_in <= 0:
                return self._take(same)
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), due_in)

    def _take(self, same: list[_Pending]) -> list[_Pending]:
        """Oldest first under the token budget; the head always goes (alone if it exceeds the budget)."""
        batch, tokens = [], 0
        for p in same:
            if batch and tokens + p.tokens > self.max_batch_tokens:
                continue  # a smaller later request may still fit
            batch.append(p)
            tokens += p.tokens
        for p in batch:
            self._queue.remove(p)
        self._queued_tokens -= tokens
        self._depth_changed()
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            items = [it for p in live for it in p.items]
            tokens = sum(p.tokens for p in live)
            self._record(len(live), len(items), tokens)
            try:
                results = await self.backend.score(items, live[0].params)
                if len(results) != len(items):
                    raise BackendError(f"backend returned {len(results)} results for {len(items)} sequences")
            except Exception as e:  # isolated: only this batch's requests see it
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                return
            start = 0
            for p in live:
                part = results[start : start + len(p.items)]
                start += len(p.items)
                if not p.future.done():
                    p.future.set_result(part)
        finally:
            self._slots.release()

    def _record(self, requests: int, sequences: int, tokens: int) -> None:
        s = self.stats
        s.batches += 1
        s.requests += requests
        s.sequences += sequences
        s.tokens += tokens
        if self._on_batch is not None:
            self._on_batch(requests, sequences, tokens)
        log.debug("batch: %d requests, %d sequences, %d tokens", requests, sequences, tokens)
