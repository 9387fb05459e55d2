"""The `asymkd.v1.Teacher` gRPC servicer: converts proto <-> engine types and maps errors to status codes.

Nothing here computes a teacher signal: requests are validated (validation.py), scored through the
micro-batcher (batching.py) or the backend's generate, and encoded with the wire codec.

Status codes: a RequestError keeps its own code; a ValueError from the engine -> INVALID_ARGUMENT; a known
signal the backend lacks (UnsupportedSignal / NotImplementedError) -> UNIMPLEMENTED; anything else is
logged with its traceback -> INTERNAL. A client that goes away cancels its work and is logged at DEBUG.
A refusal no retry can fix (request over --max-request-tokens, response over the message limit) also sets
the trailing metadata ("asymkd-retryable", "false"); a full queue does not (it is worth retrying).
Bytes that are not a valid request message are the caller's mistake too: the methods are registered with
request deserializers that never raise (`add_teacher_servicer`, registration.py); what did not parse arrives as an
`Undecodable` and is answered INVALID_ARGUMENT (`request: not a valid asymkd.v1.ScoreRequest (...)`; on
ScoreStream `stream message N: ...`, N counted from 0), where gRPC's own deserializer failure gave UNKNOWN.

ScoreStream: requests are read as they arrive and worked on concurrently (at most `max_stream_inflight`
per stream, unsent results included; reading pauses beyond it, which back-pressures the client). Responses
carry the request_id they answer and may arrive out of order; a result larger than `stream_chunk_bytes` is
split by rows over several ScoreResponses (each SequenceScores names its `sequence_index` and `first_row`;
`last` is set on the final response of a request). A stream has one status, so a bad request on it (or a
full queue) ends the whole stream with that request's status, its details starting with
`request 'ID': field: ...`; responses already sent stay valid, requests still in flight get no answer.
request_id must be non-empty and unique among a stream's in-flight requests. While the server drains
(SIGTERM) a stream takes no new request and ends with UNAVAILABLE once every request it took is answered,
so a long-lived stream neither holds the shutdown up nor loses a request.

Transport (validation.parse_transport): PACKED_IDS packs ids and counts to ceil(log2 V) bits; a request naming
a `data_plane_session` (OpenDataPlane, data_plane.py) gets its FULL / HIDDEN rows over that session's group,
described by ScoreResponse.remote on its final response (an unknown session: FAILED_PRECONDITION, before any
scoring). GetOutputLayer streams the output layer (output_layer.py) that turns HIDDEN rows into logits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from asymkd.contract import DataPlane, IdEncoding, SequenceScores, Signal
from asymkd.remote import RemoteRef
from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc
from asymkd.wire import (
    STREAM_OPEN,
    VALUE_DTYPES,
    WireError,
    chunk_to_proto,
    info_to_proto,
    scores_to_proto,
    split_results,
)
from teacher_server.backends.base import ScoreParams, TeacherBackend, UnsupportedSignal
from teacher_server.batching import MicroBatcher
from teacher_server.config import ServeConfig
from teacher_server.data_plane import DataPlaneServer, SessionClosed
from teacher_server.metrics import Metrics
from teacher_server.output_layer import OutputLayerExport
from teacher_server.registration import add_teacher_servicer, checked  # noqa: F401  (server.py imports it here)
from teacher_server.text import Detokenizer, TextCodec
from teacher_server.validation import (
    Limits,
    RequestError,
    Transport,
    check_response_size,
    estimate_response_bytes,
    invalid,
    parse_generate_request,
    parse_score_request,
    parse_transport,
)

log = logging.getLogger("asymkd.teacher.servicer")


def status_of(exc: BaseException, rpc: str) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised while serving `rpc` to (status code, details)."""
    if isinstance(exc, RequestError):
        return exc.code, str(exc)
    if isinstance(exc, UnsupportedSignal | NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented by this teacher"
    if isinstance(exc, WireError | ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.error("%s failed unexpectedly", rpc, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"teacher error ({type(exc).__name__}: {exc}); see the server log"


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    """Serves one backend; answers UNAVAILABLE until `attach` (the model is loaded and warm)."""

    def __init__(self, cfg: ServeConfig, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.backend: TeacherBackend | None = None
        self.batcher: MicroBatcher | None = None
        self.limits: Limits | None = None
        self.chunk_bytes = min(cfg.stream_chunk_bytes, cfg.max_message_bytes // 2)
        self.draining = False
        self._sessions: set[_StreamSession] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.data_plane: DataPlaneServer | None = None
        self.output_layer: OutputLayerExport | None = None
        self.text_codec: TextCodec | None = None  # Generate: text prompts, return_text

    def attach(self, backend: TeacherBackend, batcher: MicroBatcher) -> None:
        self.limits = Limits.from_info(backend.info, self.cfg.max_request_tokens)
        if Signal.HIDDEN in backend.info.signals:
            self.output_layer = OutputLayerExport.of(backend)
        self.data_plane = DataPlaneServer(self.cfg.host, getattr(backend, "device", "cpu"))  # store: lazily
        tokenizer = getattr(backend, "tokenizer", None)
        self.text_codec = None if tokenizer is None else TextCodec(tokenizer)
        self.backend, self.batcher = backend, batcher

    def close(self) -> None:
        """Close the data-plane sessions (their peers see the groups go)."""
        if self.data_plane is not None:
            self.data_plane.close()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new calls (UNAVAILABLE) and wait for those in flight; False if some outlived the timeout.

        Health watchers and reflection calls are not waited for: only Teacher RPCs count.
        """
        self.draining = True
        for session in self._sessions:  # open streams end once their requests are answered
            session.out.put_nowait(_DRAIN)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def _ready(self) -> tuple[TeacherBackend, MicroBatcher, Limits]:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "teacher is shutting down; retry elsewhere")
        if self.backend is None or self.batcher is None or self.limits is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "teacher is loading its model; retry shortly")
        return self.backend, self.batcher, self.limits

    @contextlib.asynccontextmanager
    async def _call(self, rpc: str, context: grpc.aio.ServicerContext, record: bool = True):
        """Time the call, and turn any exception into the right status (see the module docstring)."""
        t0, code = time.perf_counter(), "OK"
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            log.debug("%s cancelled (client gone or server stopping)", rpc)
            raise
        except grpc.aio.AbortError:
            code = "ABORTED"
            raise
        except Exception as e:
            status, details = status_of(e, rpc)
            code = status.name
            if isinstance(e, RequestError) and e.trailing_metadata():
                context.set_trailing_metadata(e.trailing_metadata())
            await context.abort(status, details)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            if record:
                self.metrics.observe_request(rpc, code, time.perf_counter() - t0)

    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.TeacherInfo:
        async with self._call("GetInfo", context):
            checked(request)
            backend, _, limits = self._ready()
            layer = self.output_layer
            torch_plane = self.data_plane and self.data_plane.available_backends(self.data_plane.device)
            info = dataclasses.replace(
                backend.info,
                max_top_k=limits.max_top_k,
                max_request_tokens=self.cfg.max_request_tokens,
                max_message_bytes=self.cfg.max_message_bytes,
                value_dtypes=VALUE_DTYPES,
                id_encodings=tuple(IdEncoding),
                data_planes=(DataPlane.GRPC, DataPlane.TORCH) if torch_plane else (DataPlane.GRPC,),
                output_layer=None if layer is None else await asyncio.to_thread(layer.info),  # hashed once
            )
            return info_to_proto(info)

    async def _score(
        self, request: pb.ScoreRequest, max_bytes: int | None
    ) -> tuple[ScoreParams, list[SequenceScores], Transport, list[RemoteRef]]:
        """Validate and score one request; `max_bytes` refuses a result that cannot travel (unary). FULL /
        HIDDEN rows of a request naming a data-plane session go to that session (RemoteRefs)."""
        _, batcher, limits = self._ready()
        items, params = parse_score_request(request, limits)
        transport = parse_transport(request, limits)
        if transport.remote:
            self._session(transport.session)  # refused before any work
        if max_bytes is not None:
            estimate = estimate_response_bytes(items, params, limits, transport.remote)
            check_response_size(estimate, max_bytes, params)
        scores = await batcher.submit(items, params)
        refs = []
        if transport.remote:
            try:
                refs = self.data_plane.detach_remote(transport.session, scores)
            except SessionClosed as e:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION, "data_plane_session", str(e)
                ) from None
        return params, scores, transport, refs

    def _session(self, name: str) -> None:
        try:
            self.data_plane.session(name)
        except SessionClosed as e:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "data_plane_session", str(e)) from None

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        async with self._call("Score", context):
            params, scores, tr, refs = await self._score(checked(request), self.cfg.max_message_bytes)
            response = pb.ScoreResponse(
                request_id=request.request_id,
                results=[scores_to_proto(s, i, None, tr.id_bits) for i, s in enumerate(scores)],
                last=True,
                remote=[r.to_proto() for r in refs],
            )
            # The estimate was checked before scoring; this catches what it could not know.
            check_response_size(response.ByteSize(), self.cfg.max_message_bytes, params)
            return response

    async def ScoreStream(self, request_iterator, context) -> AsyncIterator[pb.ScoreResponse]:
        # Per-request metrics are recorded by the session; the stream itself is not timed.
        async with self._call("ScoreStream", context, record=False):
            self._ready()
            await context.send_initial_metadata((STREAM_OPEN,))
            session = _StreamSession(self, request_iterator)
            async for response in session.responses():
                yield response

    async def score_one_streamed(self, request: pb.ScoreRequest) -> list[pb.ScoreResponse]:
        """Score one request of a stream and encode its result as one or more ScoreResponses."""
        _, scores, tr, refs = await self._score(request, None)
        rid = request.request_id
        groups = split_results(scores, self.chunk_bytes, tr.id_bits)
        out = [pb.ScoreResponse(request_id=rid, results=g) for g in groups]
        out[-1].last = True
        out[-1].remote.extend(r.to_proto() for r in refs)
        return out

    async def OpenDataPlane(self, request: pb.OpenDataPlaneRequest, context) -> pb.DataPlaneOffer:
        async with self._call("OpenDataPlane", context):
            checked(request)
            self._ready()
            if self.cfg.tls_cert and not self.data_plane.sessions:
                log.warning("data plane: tensors travel unencrypted (gloo/NCCL have no TLS); the token only "
                            "decides who joins")  # fmt: skip
            return pb.DataPlaneOffer(**vars(self.data_plane.open(request.backend)))

    async def GetOutputLayer(self, request: pb.GetOutputLayerRequest, context) -> AsyncIterator:
        async with self._call("GetOutputLayer", context):
            checked(request)
            self._ready()
            if request.chunk_bytes < 0:
                raise invalid(
                    "chunk_bytes", f"{request.chunk_bytes} is negative (0 = the server's chunk size)"
                )
            if self.output_layer is None:
                raise RequestError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "",
                    "this teacher serves no output layer (no HIDDEN signal)",
                )
            chunk_bytes = min(request.chunk_bytes or self.chunk_bytes, self.cfg.max_message_bytes // 2)
            for msg in self.output_layer.chunks(max(chunk_bytes, 1024)):
                yield msg

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        async with self._call("Generate", context):
            backend, _, limits = self._ready()
            codec = self.text_codec
            prompts, params = parse_generate_request(checked(request), limits, codec)
            texts: dict[tuple[int, int], Detokenizer] = {}
            chunks = backend.generate(prompts, params)
            # aclosing: a client that goes away closes the backend's generator, which stops its work.
            async with _aclosing(chunks):
                async for chunk in chunks:
                    self.metrics.tokens_generated.inc(len(chunk.token_ids))
                    if request.return_text:
                        key = (chunk.prompt_index, chunk.sample_index)
                        det = texts.setdefault(key, codec.detokenizer())
                        chunk.text = det.add(chunk.token_ids) + (det.finish() if chunk.finished else "")
                    yield chunk_to_proto(request.request_id, chunk)


@contextlib.asynccontextmanager
async def _aclosing(it):
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


_END = object()  # the client closed its side and every request was answered
_DRAIN = object()  # the server is draining: finish what is in flight, accept nothing new


class _StreamSession:
    """One ScoreStream call: a reader task submits requests as they arrive; results are yielded as ready."""

    def __init__(self, servicer: TeacherServicer, requests: AsyncIterator[pb.ScoreRequest]):
        self.servicer = servicer
        self.requests = requests
        self.out: asyncio.Queue = asyncio.Queue()
        self.slots = asyncio.Semaphore(servicer.cfg.max_stream_inflight)
        self.in_flight: set[str] = set()  # request ids not fully answered yet
        self.tasks: set[asyncio.Task] = set()
        self.draining = False

    async def responses(self) -> AsyncIterator[pb.ScoreResponse]:
        reader = asyncio.create_task(self._read())
        self.servicer._sessions.add(self)
        try:
            while True:
                if self.draining and not self.in_flight:
                    raise _shutting_down("reconnect to another replica (every request sent was answered)")
                item = await self.out.get()
                if item is _END:
                    return
                if item is _DRAIN:
                    self.draining = True
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.last:
                    self.in_flight.discard(item.request_id)
                    self.slots.release()
        finally:
            self.servicer._sessions.discard(self)
            reader.cancel()
            for t in list(self.tasks):
                t.cancel()

    async def _read(self) -> None:
        try:
            position = -1
            async for request in self.requests:
                position += 1
                await self.slots.acquire()
                rid = checked(request, f"stream message {position}").request_id
                if self.servicer.draining:
                    raise _shutting_down(f"request {rid!r} was not started; send it to another replica")
                if not rid:
                    raise invalid("request_id", "required on ScoreStream (responses are matched by it)")
                if rid in self.in_flight:
                    raise invalid("request_id", f"{rid!r} is already in flight on this stream")
                self.in_flight.add(rid)
                task = asyncio.create_task(self._handle(request))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            while self.tasks:
                await asyncio.gather(*list(self.tasks), return_exceptions=True)
            self.out.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.out.put_nowait(e)

    async def _handle(self, request: pb.ScoreRequest) -> None:
        """Score one request; its responses (or its error) go to the out queue."""
        t0, code = time.perf_counter(), "OK"
        try:
            for response in await self.servicer.score_one_streamed(request):
                self.out.put_nowait(response)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            status, details = status_of(e, "ScoreStream")
            code = status.name
            retryable = e.retryable if isinstance(e, RequestError) else None
            message = f"request {request.request_id!r}: {details}"
            self.out.put_nowait(RequestError(status, "", message, retryable=retryable))
        finally:
            self.servicer.metrics.observe_request("ScoreStream", code, time.perf_counter() - t0)


def _shutting_down(what: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, "", f"teacher is shutting down; {what}")
