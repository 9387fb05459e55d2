"""The client's ScoreStream machinery: one call, a window of requests in flight, results in order (client.py
uses it for `score_stream`), and how data-plane tensors are put into the results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import torch

from asymkd.contract import SequenceScores
from asymkd.remote import RemoteRef, fill_remote
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import STREAM_OPEN, DataLossError, ScoreAssembly, ScoreQuery, expected_rows
from teacher_server.client_policy import TeacherError, TeacherTimeoutError, TeacherUnavailableError

if TYPE_CHECKING:
    from teacher_server.client import AsyncTeacherClient

log = logging.getLogger("asymkd.client")

# fetch_remote(ref) -> the tensor the server sent over the data plane for it
FetchRemote = Callable[[RemoteRef], Awaitable[torch.Tensor]]


async def fill_results(
    results: list[SequenceScores], refs: list[RemoteRef], rows: list[int], fetch: FetchRemote | None
) -> list[SequenceScores]:
    """Put a request's data-plane tensors (fetched in order) into its per-sequence results."""
    if refs and fetch is None:
        raise DataLossError("the answer's rows went over a data plane, but no fetch_remote was given")
    for ref in refs:
        fill_remote(results, ref, await fetch(ref), rows)
    return results


def query_source(queries, defaults: dict) -> Callable[[], object]:
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


class ScoreStreamRun:
    """One score_stream(): one ScoreStream call, the window of requests sent and not yet yielded, results in
    order. A writer task sends queued requests (a slow send never blocks reading), a reader task forwards
    every response, then the end (None or the AioRpcError), to `events`."""

    def __init__(self, client: AsyncTeacherClient, max_in_flight: int, source: Callable, fetch=None):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.c, self.window, self.source, self.fetch = client, max_in_flight, source, fetch
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
                await self._handle(await self._next_event())

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
            # Write only once the server has accepted the call (wire.STREAM_OPEN): a refused call (a missing
            # token, a draining server) ends without it, and the reader reports its status.
            metadata = await self.call.initial_metadata()
            if metadata is None or metadata.get(STREAM_OPEN[0]) != STREAM_OPEN[1]:
                return
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

    async def _handle(self, event) -> None:
        if isinstance(event, pb.ScoreResponse):
            p = self.pending.get(event.request_id)
            if p is None:
                return
            try:
                p.assembly.add(event)
                if p.assembly.complete:
                    del self.pending[event.request_id]
                    asm = p.assembly
                    self.ready[p.index] = await fill_results(asm.results(), asm.remote, asm.rows, self.fetch)
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
