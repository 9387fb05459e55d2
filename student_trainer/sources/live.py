"""The live teacher feed (`teacher.targets`): a background thread per rank keeps up to `prefetch` batches in
flight to the teacher servers, and hands their answers over in data order, exactly once each.

    feed = TeacherFeed(batches, cfg.teacher, cfg.distill, StudentSide(vocab_size=V, tokenizer_hash=h, ...))
    for mb in feed:             # MicroBatch, in data order, exactly one per batch
        step(mb.batch, mb.teacher)
    feed.close()

The thread runs an asyncio loop with one `AsyncTeacherClient` (gRPC balances its calls over the replicas,
skips replicas that are down, loading or draining, and retries a call that has not been answered yet). Each
batch read becomes one task that sends it as one request on its own ScoreStream call (large FULL answers
arrive in chunks); up to `prefetch` batches are in flight, so while the training loop works on batch i,
batches i+1..i+prefetch are being scored. Backpressure: a batch is read from the data iterator only when one
of `prefetch` slots is free, and a slot frees when the training loop takes a result. (One call per batch,
rather than one long stream whose source blocks on backpressure, keeps the per-request deadline honest: a
slow training step never counts as teacher time.)

Exactly once (this is the one layer that owns it): every batch read gets an index; its task keeps it until it
has an answer; answers are handed over in index order. When a call fails with a retryable status (the client
has already retried it, e.g. the only teacher is restarting), the whole batch is sent again, never skipped:
meanwhile the feed backs off and repeats the GetInfo handshake (the teacher that comes back must still fit),
until no answer has come for `teacher.retry_deadline_s`. At start it waits as long for a teacher that is not
up yet, for `teacher.connect_timeout_s`. Either wait logs one line per change of state (not per retry) and
ends in a TeacherUnreachableError naming the address and the last error. Any other error (bad request,
incompatible teacher, deadline) is raised in the training thread, gRPC status and details included. The
handshake itself is `common.negotiate`.

Signals (the request of each: signals.build_query): HIDDEN fetches the teacher's output layer at the
handshake (teacher_head.py; again if a restarted teacher's differs) and hands it with every batch. AT_IDS
cannot be prefetched: each MicroBatch comes with `resolve(ids)`, which the step calls after the student's
forward; the request then goes through the same exactly-once path (the training thread waits for it).
`teacher.data_plane: torch` opens a data-plane session at the handshake (sources/data_plane.py) with one
replica per rank (targets[rank % n]): FULL / HIDDEN rows come over the pair group; a broken session or one
the teacher no longer knows (it restarted) counts as a retryable failure: the batch is sent again on a new
session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from asymkd.contract import IdEncoding, Signal, TeacherInfo
from asymkd.wire import ScoreQuery
from student_trainer.config import DistillSection, TeacherSection, client_options
from student_trainer.sources.base import MicroBatch, Resolver, StudentSide, TeacherBatch
from student_trainer.sources.common import TeacherUnreachableError, negotiate, scatter_scores, wanted_signal
from student_trainer.sources.data_plane import DataPlaneError, PlaneLink
from student_trainer.sources.signals import build_query, id_encoding, scored_rows
from student_trainer.teacher_head import fetch_teacher_head
from teacher_server.client import AsyncTeacherClient, TeacherError

log = logging.getLogger("asymkd.student.feed")
_END = object()
_MAX_BACKOFF_S = 5.0


__all__ = ["TeacherFeed", "backoff_s", "build_query"]


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number `attempt` (1, 2, ...): base·2^(attempt-1) capped at max_s, half of it random
    so that ranks failed over together do not retry in lockstep."""
    cap = min(max_s, base_s * 2 ** max(attempt - 1, 0))
    return cap / 2 + random.uniform(0.0, cap / 2)


class TeacherFeed:
    """Iterate for MicroBatch items (see the module docstring). `client_factory(targets, **options)` returns
    an AsyncTeacherClient-like object (called once, on the feed's thread); tests of the feed's logic pass a
    stand-in."""

    def __init__(
        self,
        batches: Iterable[dict],
        teacher: TeacherSection,
        distill: DistillSection,
        student: StudentSide,
        *,
        backoff_base_s: float = 0.25,
        client_factory: Callable[..., AsyncTeacherClient] = AsyncTeacherClient,
    ) -> None:
        if not teacher.targets:
            raise ValueError("teacher.targets is empty: the feed needs at least one teacher address")
        self._data = iter(batches)
        self.teacher, self.distill, self.student = teacher, distill, student
        self._factory, self._backoff_base_s = client_factory, backoff_base_s
        # Each rank starts at a different replica; gRPC round-robins from there (the data plane pins one).
        shift = student.rank % len(teacher.targets)
        self._targets = list(teacher.targets[shift:]) + list(teacher.targets[:shift])
        if teacher.data_plane == "torch":
            self._targets = self._targets[:1]
        self._plane = PlaneLink(self._targets[0], student.device) if teacher.data_plane == "torch" else None
        self._signal = wanted_signal(distill)
        self._encoding = IdEncoding.INT32_IDS
        self.head = None  # HIDDEN: the teacher's output layer on the student's device
        self._out: queue.Queue = queue.Queue()  # MicroBatch | _END | BaseException, in order
        self._ready: dict[int, MicroBatch] = {}  # answered, waiting for earlier batches (feed thread only)
        self._read = self._delivered = self._taken = 0
        self.resends = 0  # batches sent again after a teacher failure
        self._client = None
        self._epoch = 0  # +1 each time the feed recovered from an outage (handshake passed again)
        self._outage_since: float | None = None  # first failure since the last answer
        self._attempt = 0
        self._last_state: tuple | None = None  # (code, details) last logged
        self.top_k = distill.top_k
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._slots: asyncio.Semaphore | None = None
        self._lock: asyncio.Lock | None = None
        self._started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"teacher-feed-r{student.rank}", daemon=True
        )
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

    def __iter__(self) -> Iterator[MicroBatch]:
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
        """Stop the feed thread (batches still in flight are dropped) and close the data-plane session."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout=30.0)
        if self._plane is not None:
            self._plane.close()

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
        self._client = self._factory(self._targets, **client_options(self.teacher))
        try:
            await self._handshake_until_up()
            async with asyncio.TaskGroup() as group:
                while (item := await self._read_next()) is not None:
                    if self._signal == Signal.AT_IDS:  # asked after the student's forward (resolve)
                        self._deliver(self._deferred(*item[:2]))
                    else:
                        group.create_task(self._score(*item))
            if self._signal == Signal.AT_IDS:  # the last batches are asked for after their forward: keep
                self._out.put(_END)  # the loop and the client up until close() cancels this task
                await asyncio.Event().wait()
        except BaseExceptionGroup as group_error:  # the first failing batch's error, not the group
            raise group_error.exceptions[0] from None
        finally:
            await self._client.close()

    async def _read_next(self) -> tuple[int, dict, ScoreQuery] | None:
        """The next data batch once a slot is free (backpressure); None at the end of the data."""
        await self._slots.acquire()
        batch = await asyncio.to_thread(next, self._data, _END)
        if batch is _END:
            return None
        index, self._read = self._read, self._read + 1
        if self._signal == Signal.AT_IDS:
            return index, batch, None
        return index, batch, build_query(batch, self.distill, self.top_k, encoding=self._encoding)

    async def _score(self, index: int, batch: dict, query: ScoreQuery) -> None:
        self._deliver(MicroBatch(batch, await self._answer(batch, query), 0.0, index))

    def _deliver(self, mb: MicroBatch) -> None:
        self._ready[mb.index] = mb
        while self._delivered in self._ready:  # hand over in data order
            self._out.put(self._ready.pop(self._delivered))
            self._delivered += 1

    def _deferred(self, index: int, batch: dict) -> MicroBatch:
        """AT_IDS: the batch now, its teacher answer when the step calls resolve(ids) (training thread)."""
        mb = MicroBatch(batch, TeacherBatch(valid=scored_rows(batch["loss_mask"])), 0.0, index)

        def ask(ids) -> TeacherBatch:
            t0 = time.perf_counter()
            query = build_query(batch, self.distill, self.top_k, encoding=self._encoding, at_ids=ids)
            answer = asyncio.run_coroutine_threadsafe(self._answer(batch, query, ids), self._loop).result()
            mb.wait_ms += (time.perf_counter() - t0) * 1e3
            return answer

        mb.resolve = Resolver(ask, self.info.vocab_size)
        return mb

    async def _answer(self, batch: dict, query: ScoreQuery, at_ids=None) -> TeacherBatch:
        """Score one batch until it has its answer: after a retryable failure the whole batch is sent again
        (its partial answer, if any, is dropped), so it is answered exactly once."""
        while True:
            epoch, session, fetch = self._epoch, None, {}
            try:
                if self._plane is not None:  # fetch from the very session the request names
                    await self._plane.ensure(self._client)
                    session = query.data_plane_session = self._plane.session
                    fetch = {"fetch_remote": self._plane.plane.fetch_async}
                (scores,) = [s async for s in self._client.score_stream([query], max_in_flight=1, **fetch)]
            except (TeacherError, DataPlaneError) as e:
                if not (isinstance(e, DataPlaneError) or e.retryable or _lost_session(e)):
                    raise
                self.resends += 1
                if self._plane is not None:
                    self._plane.reset(session)  # a new session comes with the handshake
                await self._recover(e if isinstance(e, TeacherError) else _as_unavailable(e), epoch)
                continue
            self._outage_since = None
            teacher = scatter_scores(
                scores,
                batch["loss_mask"],
                top_k=self.distill.top_k,
                vocab_size=self.student.vocab_size,
                at_ids=at_ids,
            )
            teacher.head = self.head
            return teacher

    async def _recover(self, err: TeacherError, epoch: int) -> None:
        """After a retryable failure: back off, then pass the handshake again; one recovery per outage (the
        batches that failed in the same outage wait for it); gives up after teacher.retry_deadline_s."""
        async with self._lock:
            if self._epoch != epoch:  # another batch's task recovered since this one was sent
                return
            await self._handshake_until_up(err)
            self._epoch += 1

    async def _handshake_until_up(self, err: TeacherError | None = None) -> None:
        """GetInfo + handshake, retried while the teacher is unreachable: at start for connect_timeout_s, in an
        outage for retry_deadline_s (counted from its first failure)."""
        while True:
            if err is not None:
                await self._back_off(err)
            try:
                await self._handshake()
                return
            except TeacherError as e:
                if not e.retryable:
                    raise
                err = e

    async def _back_off(self, err: TeacherError) -> None:
        now = time.monotonic()
        starting = not self._started.done()
        if self._outage_since is None:
            self._outage_since, self._attempt, self._last_state = now, 0, None
        down_s = now - self._outage_since
        limit_key = "connect_timeout_s" if starting else "retry_deadline_s"
        limit_s = getattr(self.teacher, limit_key)
        if down_s > limit_s:
            where = ",".join(self._targets)
            msg = (
                f"no answer from the teacher at {where} for {down_s:.0f} s (teacher.{limit_key}={limit_s:g})"
            )
            raise TeacherUnreachableError(
                f"{msg}; last: {err.method} {err.code.name}: {err.details}"
            ) from err
        self._attempt += 1
        delay = backoff_s(self._attempt, self._backoff_base_s, _MAX_BACKOFF_S)
        state = (err.code, err.details)
        if state != self._last_state:  # one line per change of state, not per retry
            self._last_state = state
            what = "waiting for the teacher" if starting else "teacher unavailable"
            log.warning(
                "%s at %s (%s: %s); %s", what, ",".join(self._targets), err.code.name, err.details[:200],
                f"up to {limit_s - down_s:.0f} s more" if starting else f"{self.in_flight} batches to resend",
            )  # fmt: skip
        await asyncio.sleep(delay)

    async def _handshake(self) -> None:
        info = await self._client.info()
        self.top_k = negotiate(info, self.distill, self.teacher, self.student)
        self._encoding = id_encoding(info, self.distill)
        await self._fetch_head(info)
        if self._plane is not None:
            try:
                await self._plane.ensure(self._client)
            except DataPlaneError as e:  # a rendezvous that failed: like a teacher not up yet
                raise _as_unavailable(e) from e
        if self._last_state is not None:
            log.warning("teacher answering at %s again", ",".join(self._targets))
            self._last_state = None
        if not self._started.done():
            log.info(
                "teacher %s (%s, vocab %d) at %s | signal %s top_k %d T %.2f | prefetch %d",
                info.model, info.backend, info.vocab_size, ",".join(self._targets), self.distill.signal,
                self.distill.top_k, self.distill.temperature, self.teacher.prefetch,
            )  # fmt: skip
            self._started.set_result(info)

    async def _fetch_head(self, info: TeacherInfo) -> None:
        """HIDDEN: the teacher's output layer, fetched once (again if a restarted teacher's differs)."""
        if self._signal != Signal.HIDDEN:
            return
        known = getattr(self, "info", None)
        if self.head is None or known is None or known.output_layer != info.output_layer:
            self.head = await fetch_teacher_head(self._client, info, self.student.device)
            self.info = info


def _lost_session(e: TeacherError) -> bool:
    """The teacher no longer knows our data-plane session (it restarted): open a new one and resend."""
    return e.code == grpc.StatusCode.FAILED_PRECONDITION and "data_plane_session" in e.details


def _as_unavailable(e: DataPlaneError) -> TeacherError:
    return TeacherError(grpc.StatusCode.UNAVAILABLE, f"data plane: {e}", "", "data plane")
