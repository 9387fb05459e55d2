"""Python client of the teacher service: every replica behind one gRPC channel; results as torch tensors.

    from teacher_server.client import TeacherClient, AsyncTeacherClient
    with TeacherClient(["10.0.0.1:50051", "10.0.0.2:50051"], timeout_s=60) as c:
        info = c.info()                                          # TeacherInfo
        scores = c.score([[1, 2, 3, 4]], top_k=64)               # list[SequenceScores], one per sequence
        for res in c.score_stream(batches, max_in_flight=8):     # pipelined ScoreStream, ordered results
            ...
        samples = c.generate([[1, 2, 3]], max_new_tokens=16, n=2)   # [prompt][sample] -> GeneratedSample
        for chunk in c.generate_stream(["Once upon a time"], seed=1, return_text=True):  # text prompts too
            print(chunk.text, end="")

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

Tensor data plane: `open_data_plane()` asks for a session (asymkd.contract.DataPlaneOffer); a ScoreQuery naming
it gets its FULL / HIDDEN rows as RemoteRefs, which `score`/`score_stream` hand to the caller's `fetch_remote`
coroutine (the student's side of the pair group, student_trainer/sources/data_plane.py) and put into the
results. `output_layer()` streams the teacher's output layer (for HIDDEN).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import grpc.aio
import torch

from asymkd.contract import (
    DataPlaneOffer,
    GenerateChunk,
    GeneratedSample,
    SequenceScores,
    Signal,
    TeacherInfo,
)
from asymkd.remote import RemoteRef
from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc as pb_grpc
from asymkd.wire import (
    DataLossError,
    ScoreQuery,
    TokenIds,
    collect_samples,
    decode_generate_chunk,
    decode_pieces,
    expected_rows,
    generate_request,
    info_from_proto,
    tensor_from_proto,
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
from teacher_server.client_stream import FetchRemote, ScoreStreamRun, fill_results, query_source
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

    async def open_data_plane(self, backend: str = "gloo") -> DataPlaneOffer:
        """A data-plane session on one replica (the caller joins its pair group; see the module docstring)."""
        try:
            req = pb.OpenDataPlaneRequest(backend=backend)
            msg = await self.stub.OpenDataPlane(req, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise self.error(e, "OpenDataPlane") from e
        return DataPlaneOffer(
            msg.session, msg.store_host, msg.store_port, msg.token, msg.backend, msg.timeout_s
        )

    async def output_layer(self, chunk_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's output layer: weight (V, H) and bias (V,) or None, in the dtype it serves (check it
        against `info().output_layer`: asymkd.wire.output_layer_fingerprint)."""
        parts, bias = [], None
        call = self.stub.GetOutputLayer(
            pb.GetOutputLayerRequest(chunk_bytes=chunk_bytes), timeout=self.timeout_s, metadata=self._metadata
        )
        try:
            async for msg in call:
                if msg.first_row != sum(p.shape[0] for p in parts):
                    raise TeacherError(
                        grpc.StatusCode.DATA_LOSS, "output layer rows out of order", self.target
                    )
                parts.append(tensor_from_proto(msg.weight, "weight"))
                if msg.HasField("bias"):
                    bias = tensor_from_proto(msg.bias, "bias")
        except grpc.aio.AioRpcError as e:
            raise self.error(e, "GetOutputLayer") from e
        if not parts:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, "empty output layer", self.target, "GetOutputLayer")
        return torch.cat(parts), bias

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

    async def score_query(
        self, query: ScoreQuery, fetch_remote: FetchRemote | None = None
    ) -> list[SequenceScores]:
        req = query.to_proto(self.new_request_id())
        try:
            resp = await self.stub.Score(req, timeout=self.timeout_s, metadata=self._metadata)
            results = [decode_pieces([r]) for r in resp.results]
            refs = [RemoteRef.from_proto(m) for m in resp.remote]
            results = await fill_results(results, refs, expected_rows(req), fetch_remote)
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
        fetch_remote: FetchRemote | None = None,
        **defaults,
    ) -> AsyncIterator[list[SequenceScores] | tuple[int, list[SequenceScores]]]:
        """Pipelined scoring on one ScoreStream call (one replica, picked by the channel's balancer).

        `queries`: ScoreQuery items, or plain lists of sequences scored with `defaults` (score()'s keyword
        arguments). At most `max_in_flight` requests are submitted and not yet yielded. Yields each request's
        list[SequenceScores] in submission order (ordered=True), else (index, results) as they complete.
        Raises TeacherTimeoutError when a request waits > timeout_s for its answer, and the call's
        TeacherError when it fails: the results yielded so far are exactly those that were answered.
        `fetch_remote` receives the data-plane tensors of queries naming a session."""
        run = ScoreStreamRun(self, max_in_flight, query_source(queries, defaults), fetch_remote)
        try:
            async for item in run.results(ordered):
                yield item
        finally:
            await run.close()

    async def generate(self, prompts: Sequence[TokenIds | str], **options) -> list[list[GeneratedSample]]:
        """Sample continuations: result[prompt][sample]. Each prompt is token ids, or a str the server
        tokenizes (a server without a tokenizer refuses it: InvalidRequestError naming prompts[i].text).
        Options: max_new_tokens (128), temperature (1.0), top_p (1.0), top_k (0: all tokens; sampling),
        n (1), seed (None: server-chosen; a seed makes the samples reproducible on one server build),
        greedy (False), top_k_logprobs (0: per-token teacher top-k log-probs when > 0), stop_token_ids
        ((): the model's EOS ids), value_dtype (float32), return_text (False: GeneratedSample.text too).
        Bad options raise InvalidRequestError (INVALID_ARGUMENT, the field named); more work than the
        server's --max-request-tokens ((prompt + max_new_tokens) × n) raises TeacherOverloadedError
        (RESOURCE_EXHAUSTED, retryable False)."""
        chunks = [c async for c in self.generate_stream(prompts, **options)]
        return collect_samples(chunks, len(prompts), max(options.get("n", 1), 1))

    async def generate_stream(
        self, prompts: Sequence[TokenIds | str], **options
    ) -> AsyncIterator[GenerateChunk]:
        """generate() as it happens: GenerateChunk items (new tokens of one (prompt, sample); with
        return_text their text), the last one of each sample `finished`. Closing the iterator early cancels
        the call: the server stops generating before its next token. A replica that fails before the first
        chunk (down, draining, queue full) is retried on another by gRPC; a failure after it raises."""
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
    open_data_plane = _blocking(AsyncTeacherClient.open_data_plane)
    output_layer = _blocking(AsyncTeacherClient.output_layer)
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
