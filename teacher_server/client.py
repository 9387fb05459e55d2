"""Python client of the teacher service: several replicas, balanced, with failover; results as torch tensors.

    from teacher_server.client import TeacherClient
    with TeacherClient(["10.0.0.1:50051", "10.0.0.2:50051"], timeout_s=60) as c:
        info = c.info()                                          # TeacherInfo
        scores = c.score([[1, 2, 3, 4]], top_k=64)               # list[SequenceScores], one per sequence
        for res in c.score_stream(batches, max_in_flight=8):     # pipelined ScoreStream, ordered results
            ...
        samples = c.generate([[1, 2, 3]], max_new_tokens=16, n=2)   # [prompt][sample] -> GeneratedSample

`AsyncTeacherClient` has the same methods as coroutines / async iterators on grpc.aio channels (the student's
background feed uses it); `TeacherClient` runs one on a private event-loop thread. This module holds the
calls and the ScoreStream pipelining; proto building and decoding live in client_codec.py, errors, retry
rules, backoff and balancing in client_policy.py (all public names are re-exported here).
Balancing: least outstanding requests, round-robin among ties. Retries: only UNAVAILABLE and (transient)
RESOURCE_EXHAUSTED, on another replica, with exponential backoff + jitter, at most `max_retries` times,
within the call's deadline (`timeout_s`); a replica answering UNAVAILABLE sits out `cooldown_s`. Other
failures, and a request the server flags as too big (trailing metadata "asymkd-retryable: false"), raise a
`TeacherError` subclass at once (code, details, address). Local argument mistakes (unknown signal name,
wrong score_from length) raise ValueError before any RPC.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import torch

from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.backends.base import GenerateChunk, Signal
from teacher_server.client_codec import (
    GeneratedSample,
    ScoreAssembly,
    ScoreQuery,
    SequenceScores,
    TeacherInfo,
    TokenIds,
    TopKScores,
    build_generate_request,
    collect_samples,
    decode_generate_chunk,
    decode_pieces,
    decode_score_response,
    expected_rows,
    resolve_signal,
    token_ids_list,
    value_dtype_code,
)
from teacher_server.client_policy import (
    RETRYABLE_CODES,
    Balancer,
    InvalidRequestError,
    TeacherError,
    TeacherOverloadedError,
    TeacherTimeoutError,
    TeacherUnavailableError,
    UnsupportedError,
    backoff_s,
    error_from_rpc,
    is_retryable,
    make_error,
    retryable_flag,
    stream_retry_decision,
)

__all__ = [
    "RETRYABLE_CODES",
    "AsyncTeacherClient",
    "Balancer",
    "GeneratedSample",
    "InvalidRequestError",
    "ScoreAssembly",
    "ScoreQuery",
    "SequenceScores",
    "TeacherClient",
    "TeacherError",
    "TeacherInfo",
    "TeacherOverloadedError",
    "TeacherTimeoutError",
    "TeacherUnavailableError",
    "TokenIds",
    "TopKScores",
    "UnsupportedError",
    "backoff_s",
    "build_generate_request",
    "channel_options",
    "collect_samples",
    "decode_generate_chunk",
    "decode_pieces",
    "decode_score_response",
    "error_from_rpc",
    "expected_rows",
    "is_retryable",
    "make_error",
    "resolve_signal",
    "retryable_flag",
    "stream_retry_decision",
    "token_ids_list",
    "value_dtype_code",
]

log = logging.getLogger("asymkd.client")


def channel_options(max_message_bytes: int, keepalive_s: float) -> list[tuple[str, int]]:
    """Message limits both ways (gRPC's default receive limit is 4 MiB) and keepalive pings on active calls
    only: a silently dead peer is detected within ~keepalive_s + 20 s; idle channels do not ping."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


# ------------------------------------------------------------------------------------------- clients
@dataclass
class _Replica:
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.TeacherStub


class AsyncTeacherClient:
    """The teacher client on grpc.aio channels (see the module docstring). Use it from one event loop."""

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        cooldown_s: float = 5.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        keepalive_s: float = 60.0,
    ):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.balancer = Balancer(len(self.targets), cooldown_s)
        self._options = channel_options(max_message_bytes, keepalive_s)
        self._replicas: list[_Replica] | None = None
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    def replica(self, i: int) -> _Replica:
        if self._replicas is None:  # lazily: aio channels belong to the event loop that first uses them
            chans = [grpc.aio.insecure_channel(t, options=self._options) for t in self.targets]
            self._replicas = [
                _Replica(t, c, pb_grpc.TeacherStub(c)) for t, c in zip(self.targets, chans, strict=True)
            ]
        return self._replicas[i]

    def new_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def retry_delay_s(self, attempt: int) -> float:
        return backoff_s(attempt, self.backoff_base_s, self.backoff_max_s)

    async def _call(self, method: str, fn: Callable[[_Replica, float], object]):
        """`await fn(replica, timeout_s)` on a balanced pick; retryable failures go to the next replica after
        a backoff, at most max_retries times and within one deadline of timeout_s for the whole call."""
        deadline = time.monotonic() + self.timeout_s
        tried: list[int] = []
        for attempt in itertools.count(1):
            i = self.balancer.pick(tried)
            rep = self.replica(i)
            self.balancer.acquire(i)
            try:
                result = await fn(rep, max(deadline - time.monotonic(), 1e-3))
                self.balancer.mark_up(i)
                return result
            except grpc.aio.AioRpcError as e:
                err, delay = error_from_rpc(e, rep.address, method), self.retry_delay_s(attempt)
                if not err.retryable or attempt > self.max_retries:
                    raise err from e
                if deadline - time.monotonic() <= delay:
                    raise err from e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.balancer.mark_down(i)
                tried.append(i)
                log.warning("%s; retry %d/%d in %.2f s", err, attempt, self.max_retries, delay)
            finally:
                self.balancer.release(i)
            await asyncio.sleep(delay)

    async def info(self) -> TeacherInfo:
        """GetInfo from one replica (all replicas of a client are expected to serve the same model)."""
        msg = await self._call("GetInfo", lambda rep, t: rep.stub.GetInfo(pb.GetInfoRequest(), timeout=t))
        return TeacherInfo.from_proto(msg)

    async def score(
        self,
        seqs: Sequence[TokenIds],
        *,
        score_from: int | Sequence[int] | None = None,
        signal: str | Signal = "top_k",
        top_k: int = 64,
        temperature: float = 1.0,
        value_dtype: torch.dtype | str = torch.float32,
        at_ids: Sequence[torch.Tensor] | None = None,
        num_samples: int = 0,
        seed: int = 0,
    ) -> list[SequenceScores]:
        """Score sequences (each L >= 2 token ids) on one unary Score call: one SequenceScores (R rows) per
        sequence, in order. See ScoreQuery for the arguments."""
        query = ScoreQuery(
            seqs, score_from, signal, top_k, temperature, value_dtype, at_ids, num_samples, seed
        )
        return await self.score_query(query)

    async def score_query(self, query: ScoreQuery) -> list[SequenceScores]:
        req = query.to_proto(self.new_request_id())
        resp = await self._call("Score", lambda rep, t: rep.stub.Score(req, timeout=t))
        if len(resp.results) != len(req.sequences):
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"{len(resp.results)} results for {len(req.sequences)}"
            )
        return decode_score_response(resp)

    async def score_stream(
        self,
        queries: Iterable[ScoreQuery | Sequence[TokenIds]] | AsyncIterator[ScoreQuery | Sequence[TokenIds]],
        *,
        max_in_flight: int = 8,
        ordered: bool = True,
        **defaults,
    ) -> AsyncIterator[list[SequenceScores] | tuple[int, list[SequenceScores]]]:
        """Pipelined scoring on ScoreStream calls (one per replica in use, requests balanced over them).

        `queries`: ScoreQuery items, or plain lists of sequences scored with `defaults` (score()'s keyword
        arguments). At most `max_in_flight` requests are submitted and not yet yielded. Yields each request's
        list[SequenceScores] in submission order (ordered=True), else (index, results) as they complete.
        A replica failing with UNAVAILABLE gets its unanswered requests resent to another replica: each
        request is answered exactly once. Raises TeacherTimeoutError when a request waits > timeout_s."""
        run = _ScoreStreamRun(self, max_in_flight, _query_source(queries, defaults))
        try:
            async for item in run.results(ordered):
                yield item
        finally:
            await run.close()

    async def generate(
        self,
        prompts: Sequence[TokenIds],
        *,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        n: int = 1,
        top_k_logprobs: int = 0,
        seed: int | None = None,
        greedy: bool = False,
        stop_token_ids: Sequence[int] = (),
        value_dtype: torch.dtype | str = torch.float32,
    ) -> list[list[GeneratedSample]]:
        """Sample `n` continuations per prompt: result[prompt][sample]. A retryable failure restarts it."""
        options = {k: v for k, v in locals().items() if k not in ("self", "prompts")}
        req = build_generate_request(prompts, **options, request_id=self.new_request_id())

        async def attempt(rep: _Replica, timeout_s: float) -> list[GenerateChunk]:
            return [decode_generate_chunk(m) async for m in rep.stub.Generate(req, timeout=timeout_s)]

        return collect_samples(await self._call("Generate", attempt), len(prompts), max(n, 1))

    async def generate_stream(self, prompts: Sequence[TokenIds], **options) -> AsyncIterator[GenerateChunk]:
        """generate() as it happens: GenerateChunk items (new tokens of one (prompt, sample)), last one
        `finished`. Same keyword arguments as generate(); retried only before the first chunk arrives."""
        req = build_generate_request(prompts, **options, request_id=self.new_request_id())

        async def first(rep: _Replica, timeout_s: float):
            call = rep.stub.Generate(req, timeout=timeout_s)
            return rep, call, await call.read()

        rep, call, msg = await self._call("Generate", first)
        try:
            while msg is not grpc.aio.EOF:
                yield decode_generate_chunk(msg)
                msg = await call.read()
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, rep.address, "Generate") from e
        finally:
            call.cancel()

    async def close(self) -> None:
        replicas, self._replicas = self._replicas or [], None
        await asyncio.gather(*(r.channel.close() for r in replicas))

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _query_source(queries, defaults: dict) -> Callable[[], object]:
    """An async `next()` over sync or async iterables of queries (None at the end). A sync iterator is
    advanced on a worker thread: a slow data loader must not stall the event loop's RPCs."""

    async def next_query():
        if is_async:
            q = await anext(it, None)
        elif isinstance(queries, list | tuple):
            q = next(it, None)
        else:
            q = await asyncio.to_thread(next, it, None)
        return q if q is None or isinstance(q, ScoreQuery) else ScoreQuery(q, **defaults)

    is_async = hasattr(queries, "__aiter__")
    it = aiter(queries) if is_async else iter(queries)
    return next_query


@dataclass(eq=False)
class _Pending:
    index: int
    request: pb.ScoreRequest
    assembly: ScoreAssembly
    replica: int = -1
    sent_at: float = 0.0
    attempts: int = 0


class _StreamSession:
    """One ScoreStream call to one replica: a writer task sends queued requests (so a slow send never blocks
    reading), a reader task forwards every response, then the end (None or the AioRpcError), to `events`."""

    def __init__(self, replica: int, stub: pb_grpc.TeacherStub, events: asyncio.Queue):
        self.replica = replica
        self.call = stub.ScoreStream()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read(events))]

    def send(self, req: pb.ScoreRequest | None) -> None:
        """Queue a request; None half-closes the stream."""
        self._outbox.put_nowait(req)

    async def _write(self) -> None:
        try:
            while (req := await self._outbox.get()) is not None:
                await self.call.write(req)
            await self.call.done_writing()
        except Exception as e:  # the call failed: the reader reports its status
            log.debug("ScoreStream writer stopped: %r", e)

    async def _read(self, events: asyncio.Queue) -> None:
        try:
            while (msg := await self.call.read()) is not grpc.aio.EOF:
                events.put_nowait((self, msg))
            events.put_nowait((self, None))
        except grpc.aio.AioRpcError as e:
            events.put_nowait((self, e))

    async def finish(self, timeout_s: float) -> None:
        """Half-close and let the server end the call; cancel it if that takes longer than timeout_s."""
        self.send(None)
        await asyncio.wait(self._tasks, timeout=timeout_s)
        self.cancel()

    def cancel(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.call.cancel()


class _ScoreStreamRun:
    """State of one score_stream(): the window of pending requests, their sessions, results in order."""

    def __init__(self, client: AsyncTeacherClient, max_in_flight: int, source: Callable):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.c, self.window, self.source = client, max_in_flight, source
        self.events: asyncio.Queue = asyncio.Queue()
        self.sessions: dict[int, _StreamSession] = {}
        self.pending: dict[str, _Pending] = {}  # submitted, not yet answered (submission order)
        self.ready: dict[int, list[SequenceScores]] = {}  # answered, not yet yielded
        self.submitted = 0

    async def results(self, ordered: bool):
        exhausted, next_out = False, 0
        while True:
            if ordered:  # deliver first: the consumer may be what frees the source's next item
                while next_out in self.ready:
                    yield self.ready.pop(next_out)
                    next_out += 1
            else:
                while self.ready:
                    yield self.ready.popitem()
            while not exhausted and len(self.pending) + len(self.ready) < self.window:
                query = await self.source()
                exhausted = query is None
                if not exhausted:
                    self._submit(query)
            if exhausted and not self.pending and not self.ready:
                return
            if self.pending:
                await self._handle(*await self._next_event())

    def _submit(self, query: ScoreQuery) -> None:
        req = query.to_proto(self.c.new_request_id())
        p = _Pending(self.submitted, req, ScoreAssembly(expected_rows(req)))
        self.submitted += 1
        self.pending[req.request_id] = p
        self._dispatch(p)

    def _dispatch(self, p: _Pending, avoid: Iterable[int] = ()) -> None:
        i = self.c.balancer.pick(avoid)
        if i not in self.sessions:
            self.sessions[i] = _StreamSession(i, self.c.replica(i).stub, self.events)
        p.replica, p.sent_at = i, time.monotonic()
        self.c.balancer.acquire(i)
        self.sessions[i].send(p.request)

    async def _next_event(self):
        # Answers already queued arrived in time: hand them over before judging any deadline, or a caller
        # that pulls results more slowly than timeout_s would get DEADLINE_EXCEEDED for answered requests.
        if not self.events.empty():
            return self.events.get_nowait()
        oldest = min(self.pending.values(), key=lambda p: p.sent_at)
        wait_s = oldest.sent_at + self.c.timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(self.events.get(), max(wait_s, 0.0))
        except TimeoutError:
            raise TeacherTimeoutError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"request {oldest.request.request_id} unanswered after {self.c.timeout_s} s",
                self.c.targets[oldest.replica],
                "ScoreStream",
            ) from None

    async def _handle(self, session: _StreamSession, msg) -> None:
        if self.sessions.get(session.replica) is not session:
            return  # a failed session's leftovers: its requests were already resent
        if isinstance(msg, pb.ScoreResponse):
            p = self.pending.get(msg.request_id)
            if p is None or p.replica != session.replica:
                return
            p.assembly.add(msg)
            if p.assembly.complete:
                del self.pending[msg.request_id]
                self.c.balancer.release(p.replica)
                self.c.balancer.mark_up(p.replica)
                self.ready[p.index] = p.assembly.results()
            return
        await self._failover(session, msg)

    async def _failover(self, session: _StreamSession, err: grpc.aio.AioRpcError | None) -> None:
        """The call ended (error, or an OK end with requests unanswered): resend its requests elsewhere."""
        del self.sessions[session.replica]
        session.cancel()
        lost = [p for p in self.pending.values() if p.replica == session.replica]
        if not lost:
            return
        if err is None:
            code, details = grpc.StatusCode.UNAVAILABLE, f"stream ended with {len(lost)} requests unanswered"
            metadata = None
        else:
            code, details, metadata = err.code(), err.details() or "", err.trailing_metadata()
        error = make_error(code, details, self.c.targets[session.replica], "ScoreStream", metadata)
        retry, down = stream_retry_decision(code, details, metadata)
        attempts = max(p.attempts for p in lost) + 1
        if not retry or attempts > self.c.max_retries:
            raise error from err
        if down:
            self.c.balancer.mark_down(session.replica)
        delay = self.c.retry_delay_s(attempts)
        log.warning("%s; resending %d requests in %.2f s", error, len(lost), delay)
        for p in lost:
            self.c.balancer.release(p.replica)
        await asyncio.sleep(delay)
        for p in lost:
            p.attempts = attempts
            p.assembly.reset()
            self._dispatch(p, avoid=[session.replica])

    async def close(self) -> None:
        """All answered: half-close and let the servers end the calls. Abandoned early: cancel them."""
        sessions, self.sessions = list(self.sessions.values()), {}
        abandoned = bool(self.pending)
        for p in self.pending.values():
            self.c.balancer.release(p.replica)
        self.pending.clear()
        for s in sessions if abandoned else ():
            s.cancel()
        await asyncio.gather(*(s.finish(timeout_s=5.0) for s in sessions if not abandoned))


# ------------------------------------------------------------------------------------ blocking client
def _blocking(method):
    @functools.wraps(method)
    def call(self: TeacherClient, *args, **kwargs):
        return self._run(method(self.aio, *args, **kwargs))

    return call


def _blocking_iter(method):
    @functools.wraps(method)
    def iterate(self: TeacherClient, *args, **kwargs) -> Iterator:
        agen = method(self.aio, *args, **kwargs)
        try:
            while True:
                try:
                    item = self._run(anext(agen))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self._run(agen.aclose())

    return iterate


class TeacherClient:
    """Blocking teacher client: an AsyncTeacherClient (same arguments) on a private event-loop thread.
    Methods and results are AsyncTeacherClient's; iterators become plain (blocking) iterators."""

    def __init__(self, targets: str | Sequence[str], **options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()
        self.aio = AsyncTeacherClient(targets, **options)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    info = _blocking(AsyncTeacherClient.info)
    score = _blocking(AsyncTeacherClient.score)
    score_query = _blocking(AsyncTeacherClient.score_query)
    generate = _blocking(AsyncTeacherClient.generate)
    score_stream = _blocking_iter(AsyncTeacherClient.score_stream)
    generate_stream = _blocking_iter(AsyncTeacherClient.generate_stream)

    @property
    def targets(self) -> list[str]:
        return self.aio.targets

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
