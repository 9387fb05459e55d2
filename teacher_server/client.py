"""Python client of the teacher service: every replica behind one gRPC channel; results as torch tensors.

    from teacher_server.client import TeacherClient, AsyncTeacherClient
    with TeacherClient(["10.0.0.1:50051", "10.0.0.2:50051"], timeout_s=60) as c:
        info = c.info()                                          # TeacherInfo
        scores = c.score([[1, 2, 3, 4]], top_k=64)               # list[SequenceScores], one per sequence
        for res in c.score_stream(batches, max_in_flight=8):     # pipelined ScoreStream, ordered results
            ...
        samples = c.generate([[1, 2, 3]], max_new_tokens=16, n=2)   # [prompt][sample] -> GeneratedSample

`AsyncTeacherClient` has the same methods as coroutines / async iterators on a grpc.aio channel (the
student's teacher feed uses it); `TeacherClient` runs one on a private event-loop thread.

Every call is a single gRPC call with a deadline of `timeout_s`. Balancing over the replicas, skipping a
replica that is down, loading or draining, and retrying UNAVAILABLE / a full queue (RESOURCE_EXHAUSTED)
with backoff on the next replica are gRPC's own (round_robin, client-side health checks, the retry policy:
client_policy.py) and apply to a call until it has received its first response: unary calls and streams
that have not answered anything yet. A stream that fails later raises: `score_stream` has then yielded
exactly the results that were answered, and the caller sends the rest again if it wants (the trainer's
teacher feed does, exactly once per batch). Failures raise a `TeacherError` subclass (code, details,
`retryable`); local argument mistakes (unknown signal name, wrong score_from length) raise ValueError before
any RPC.
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
from pathlib import Path

import grpc
import grpc.aio
import torch

from asymkd.contract import GenerateChunk, GeneratedSample, SequenceScores, Signal, TeacherInfo
from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc as pb_grpc
from asymkd.wire import (
    DataLossError,
    ScoreAssembly,
    ScoreQuery,
    TokenIds,
    collect_samples,
    decode_generate_chunk,
    decode_score_response,
    expected_rows,
    generate_request,
    info_from_proto,
)
from teacher_server.client_policy import (
    InvalidRequestError,
    TeacherError,
    TeacherOverloadedError,
    TeacherTimeoutError,
    TeacherUnavailableError,
    UnsupportedError,
    channel_options,
    channel_target,
    error_from_rpc,
    service_config,
)
from teacher_server.security import ClientSecurity

__all__ = [
    "AsyncTeacherClient",
    "InvalidRequestError",
    "ScoreQuery",
    "TeacherClient",
    "TeacherError",
    "TeacherOverloadedError",
    "TeacherTimeoutError",
    "TeacherUnavailableError",
    "UnsupportedError",
]

log = logging.getLogger("asymkd.client")


class AsyncTeacherClient:
    """The teacher client on a grpc.aio channel (see the module docstring). Use it from one event loop.

    targets: one `host:port` or gRPC URI (e.g. `dns:///teacher-headless:50051`), or several `host:port`.
    max_retries: retries per call (gRPC caps attempts at 5); backoff_base_s / backoff_max_s: the retry
    backoff (randomized by gRPC). `security` keywords (teacher_server/security.py, ClientSecurity.build):
    tls_ca (the CA of the servers' certificates; TLS is on when it or tls_cert is set), tls_cert + tls_key
    (this client's certificate, for mutual TLS), tls_server_name (the name the servers' certificates carry,
    when it is not the target's host), auth_token_file / auth_token_env (the bearer token, from a file or
    from the environment variable of that name); files are read here, once."""

    def __init__(
        self,
        targets: str | Sequence[str],
        *,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 2.0,
        max_message_bytes: int = 256 * 1024 * 1024,
        keepalive_s: float = 60.0,
        **security: str | Path | None,
    ):
        self.targets = [targets] if isinstance(targets, str) else list(targets)
        self.target = channel_target(self.targets)
        self._security = ClientSecurity.build(**security, target=self.target)
        self._metadata = self._security.metadata  # the token, when it cannot travel as call credentials
        self.timeout_s = timeout_s
        config = service_config(max_retries, backoff_base_s, backoff_max_s)
        self._options = channel_options(max_message_bytes, keepalive_s, config)
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TeacherStub | None = None
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]

    @property
    def stub(self) -> pb_grpc.TeacherStub:
        if self._stub is None:  # lazily: an aio channel belongs to the event loop that first uses it
            self._channel = self._security.aio_channel(self.target, self._options)
            self._stub = pb_grpc.TeacherStub(self._channel)
        return self._stub

    def new_request_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def error(self, err: grpc.RpcError, method: str) -> TeacherError:
        return error_from_rpc(err, self.target, method)

    async def info(self) -> TeacherInfo:
        """GetInfo from one replica (all replicas of a client are expected to serve the same model)."""
        try:
            return info_from_proto(
                await self.stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout_s, metadata=self._metadata)
            )
        except grpc.aio.AioRpcError as e:
            raise self.error(e, "GetInfo") from e

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
        try:
            resp = await self.stub.Score(req, timeout=self.timeout_s, metadata=self._metadata)
            results = decode_score_response(resp)
        except grpc.aio.AioRpcError as e:
            raise self.error(e, "Score") from e
        except DataLossError as e:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, str(e), self.target, "Score") from e
        if len(results) != len(req.sequences):
            msg = f"{len(results)} results for {len(req.sequences)} sequences"
            raise TeacherError(grpc.StatusCode.DATA_LOSS, msg, self.target, "Score")
        return results

    async def score_stream(
        self,
        queries: Iterable[ScoreQuery | Sequence[TokenIds]] | AsyncIterator[ScoreQuery | Sequence[TokenIds]],
        *,
        max_in_flight: int = 8,
        ordered: bool = True,
        **defaults,
    ) -> AsyncIterator[list[SequenceScores] | tuple[int, list[SequenceScores]]]:
        """Pipelined scoring on one ScoreStream call (one replica, picked by the channel's balancer).

        `queries`: ScoreQuery items, or plain lists of sequences scored with `defaults` (score()'s keyword
        arguments). At most `max_in_flight` requests are submitted and not yet yielded. Yields each request's
        list[SequenceScores] in submission order (ordered=True), else (index, results) as they complete.
        Raises TeacherTimeoutError when a request waits > timeout_s for its answer, and the call's
        TeacherError when it fails: the results yielded so far are exactly those that were answered."""
        run = _ScoreStreamRun(self, max_in_flight, _query_source(queries, defaults))
        try:
            async for item in run.results(ordered):
                yield item
        finally:
            await run.close()

    async def generate(self, prompts: Sequence[TokenIds], **options) -> list[list[GeneratedSample]]:
        """Sample continuations: result[prompt][sample]. Options: max_new_tokens (128), temperature (1.0),
        top_p (1.0), n (1), top_k_logprobs (0), seed (None), greedy (False), stop_token_ids (()),
        value_dtype (float32)."""
        chunks = [c async for c in self.generate_stream(prompts, **options)]
        return collect_samples(chunks, len(prompts), max(options.get("n", 1), 1))

    async def generate_stream(self, prompts: Sequence[TokenIds], **options) -> AsyncIterator[GenerateChunk]:
        """generate() as it happens: GenerateChunk items (new tokens of one (prompt, sample)), the last one of
        each sample `finished`. Closing the iterator early cancels the call (the server stops its work)."""
        req = generate_request(prompts, **options, request_id=self.new_request_id())
        call = self.stub.Generate(req, timeout=self.timeout_s, metadata=self._metadata)
        try:
            async for msg in call:
                yield decode_generate_chunk(msg)
        except grpc.aio.AioRpcError as e:
            raise self.error(e, "Generate") from e
        finally:
            call.cancel()

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

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
    request_id: str
    assembly: ScoreAssembly
    sent_at: float


class _ScoreStreamRun:
    """One score_stream(): one ScoreStream call, the window of requests sent and not yet yielded, results in
    order. A writer task sends queued requests (a slow send never blocks reading), a reader task forwards
    every response, then the end (None or the AioRpcError), to `events`."""

    def __init__(self, client: AsyncTeacherClient, max_in_flight: int, source: Callable):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.c, self.window, self.source = client, max_in_flight, source
        self.events: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.call = None
        self.tasks: list[asyncio.Task] = []
        self.pending: dict[str, _Pending] = {}  # sent, not yet answered
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
                self._handle(await self._next_event())

    def _submit(self, query: ScoreQuery) -> None:
        if self.call is None:
            self.call = self.c.stub.ScoreStream(metadata=self.c._metadata)
            self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]
        req = query.to_proto(self.c.new_request_id())
        self.pending[req.request_id] = _Pending(
            self.submitted, req.request_id, ScoreAssembly(expected_rows(req)), time.monotonic()
        )
        self.submitted += 1
        self.outbox.put_nowait(req)

    async def _write(self) -> None:
        try:
            # A write racing the server's refusal of the call (a missing token, draining) makes grpc.aio
            # report INTERNAL "Internal error from Core" instead of the refusal
            # (https://github.com/grpc/grpc/issues/36066): wait until the call is established first.
            await self.call.wait_for_connection()
            while (req := await self.outbox.get()) is not None:
                await self.call.write(req)
            await self.call.done_writing()
        except Exception as e:  # the call failed: the reader reports its status
            log.debug("ScoreStream writer stopped: %r", e)

    async def _read(self) -> None:
        try:
            while (msg := await self.call.read()) is not grpc.aio.EOF:
                self.events.put_nowait(msg)
            self.events.put_nowait(None)
        except grpc.aio.AioRpcError as e:
            self.events.put_nowait(e)

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
            msg = f"request {oldest.request_id} unanswered after {self.c.timeout_s} s"
            raise TeacherTimeoutError(
                grpc.StatusCode.DEADLINE_EXCEEDED, msg, self.c.target, "ScoreStream"
            ) from None

    def _handle(self, event) -> None:
        if isinstance(event, pb.ScoreResponse):
            p = self.pending.get(event.request_id)
            if p is None:
                return
            try:
                p.assembly.add(event)
                if p.assembly.complete:
                    del self.pending[event.request_id]
                    self.ready[p.index] = p.assembly.results()
            except DataLossError as e:
                raise TeacherError(grpc.StatusCode.DATA_LOSS, str(e), self.c.target, "ScoreStream") from e
            return
        if event is None:  # an OK end with requests unanswered: the server went away between them
            msg = f"stream ended with {len(self.pending)} requests unanswered"
            raise TeacherUnavailableError(grpc.StatusCode.UNAVAILABLE, msg, self.c.target, "ScoreStream")
        raise self.c.error(event, "ScoreStream") from event

    async def close(self) -> None:
        """All answered: half-close and let the server end the call. Abandoned early or failed: cancel it."""
        if self.call is None:
            return
        if not self.pending:
            self.outbox.put_nowait(None)
            await asyncio.wait(self.tasks, timeout=5.0)
        for t in self.tasks:
            t.cancel()
        self.call.cancel()


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
        self.aio = AsyncTeacherClient(targets, **options)  # checks the targets before a thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="teacher-client", daemon=True)
        self._thread.start()

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
