"""The teacher gRPC service (Teacher + health + reflection, Prometheus metrics); `asymkd serve` runs it.

    asymkd serve --model PATH --backend hf --device cpu --dtype float32 --port 50051
    asymkd serve --config serve.yaml --max-wait-ms 2          # YAML, then flags override it
    asymkd serve --help                                       # every option (ServeConfig)
    asyncio.run(serve(cfg))                                   # from Python: returns the exit code

Start-up, in order: config -> health NOT_SERVING -> gRPC server listening (health answers NOT_SERVING while
the model loads) -> backend load + warm-up -> health SERVING. SIGTERM/SIGINT: health NOT_SERVING ->
in-flight requests finish (at most `drain_timeout_s`) -> backend closed -> exit 0. Exit 2 on a bad config,
1 when the model cannot be loaded or a port cannot be listened on (one line naming it: the gRPC port is bound
exclusively, so a second server on a served port is refused instead of sharing its clients).

Security (teacher_server/security.py): `--tls-cert/--tls-key` serve every gRPC endpoint over TLS,
`--tls-client-ca` also requires client certificates (mutual TLS), `--auth-token-file` requires the bearer
token on every call but health and reflection. The default address is 127.0.0.1 (loopback only).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from asymkd.v1 import teacher_pb2
from teacher_server.config import ServeConfig
from teacher_server.security import TokenAuthInterceptor, read_token_file, server_credentials

if TYPE_CHECKING:  # torch-importing modules load in serve(): --help and config errors answer at once
    from teacher_server.backends.base import TeacherBackend
    from teacher_server.batching import MicroBatcher
    from teacher_server.servicer import TeacherServicer

log = logging.getLogger("asymkd.teacher")
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name  # "asymkd.v1.Teacher"
_HEALTH_SERVICES = ("", SERVICE_NAME)
# Room for the envelope (request_id, tags) on top of a response of exactly max_message_bytes.
_MESSAGE_MARGIN_BYTES = 64 * 1024


class _TeacherFormatter(logging.Formatter):
    """`[teacher] message`; warnings and errors also say their level: `[teacher] ERROR: message`."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname}: "
        return f"[teacher] {level}{super().format(record)}"


def configure_logging(level: str) -> None:
    """`[teacher] ...` lines on stderr at `level` (ServeConfig.log_level)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TeacherFormatter("%(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _configure_server(cfg: ServeConfig, servicer: TeacherServicer, health) -> tuple[grpc.aio.Server, int]:
    from teacher_server.servicer import add_teacher_servicer

    limit = cfg.max_message_bytes + _MESSAGE_MARGIN_BYTES
    interceptors = [TokenAuthInterceptor(read_token_file(cfg.auth_token_file))] if cfg.auth_token_file else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # gRPC binds with SO_REUSEPORT by default: a second server on a served port would start and take
            # half of the new connections. Exclusive: a taken port is refused at start.
            ("grpc.so_reuseport", 0),
        ],
    )
    add_teacher_servicer(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = f"{cfg.host}:{cfg.port}"
    reason = bind_failure(cfg.host, cfg.port)  # gRPC's own bind error says neither why nor which port
    if reason:
        raise OSError(f"cannot listen on {address}: {reason}")
    credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # grpc raises RuntimeError when the address cannot be bound
        raise OSError(f"cannot listen on {address} ({e})") from None
    return server, port


def bind_failure(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on ("the port is taken (...)"), or None when it can (port 0: any
    free port). Binds a plain socket the way gRPC does (SO_REUSEADDR, no SO_REUSEPORT) and closes it."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as e:
        return f"cannot resolve {host!r} ({e})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                taken = e.errno == errno.EADDRINUSE
                return f"the port is taken ({e})" if taken else str(e)
    return None


def _security_note(cfg: ServeConfig) -> str:
    parts = ["TLS" if cfg.tls_cert else "plaintext"]
    if cfg.tls_client_ca:
        parts.append("client certificates required")
    if cfg.auth_token_file:
        parts.append("bearer token required")
    return ", ".join(parts)


async def _set_health(health, status) -> None:
    for name in _HEALTH_SERVICES:
        await health.set(name, status)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _load(backend: TeacherBackend, stop: asyncio.Event) -> bool:
    """Load + warm the backend; False when a stop signal came first (the load is then cancelled)."""
    load = asyncio.create_task(backend.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if load.done():
        load.result()  # raises the load error, if any
        return True
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await load
    return False


def build_batcher(cfg: ServeConfig, backend: TeacherBackend, metrics) -> MicroBatcher:
    from teacher_server.batching import MicroBatcher

    return MicroBatcher(
        backend,
        max_batch_tokens=cfg.max_batch_tokens,
        max_wait_ms=cfg.max_wait_ms,
        max_queue_requests=cfg.max_queue_requests,
        max_queue_tokens=cfg.max_queue_tokens,
        max_inflight_batches=cfg.max_inflight_batches,
        on_batch=metrics.observe_batch,
        on_queue_depth=metrics.set_queue_depth,
    )


async def serve(cfg: ServeConfig) -> int:
    """Run the service until SIGTERM/SIGINT; returns the process exit code."""
    from teacher_server.backends import build_backend
    from teacher_server.metrics import Metrics
    from teacher_server.servicer import TeacherServicer

    metrics = Metrics()
    servicer = TeacherServicer(cfg, metrics)
    health = health_aio.HealthServicer()
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        server, port = _configure_server(cfg, servicer, health)
        if cfg.metrics_port is not None:
            metrics.serve(cfg.host, cfg.metrics_port)
    except (OSError, ValueError) as e:  # a port in use, a credential file that cannot be read
        print(f"asymkd serve: {e}", file=sys.stderr, flush=True)
        return 1
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await server.start()
    log.info(
        "listening on %s:%d (%s); loading %s (backend %s)",
        cfg.host,
        port,
        _security_note(cfg),
        cfg.model,
        cfg.backend,
    )
    try:
        backend = build_backend(cfg)
        ready = await _load(backend, stop)
    except Exception as e:
        # A missing folder or a bad option is the operator's to fix: say it in one line, no traceback.
        if isinstance(e, OSError | ValueError | ImportError):
            log.error("could not load the teacher model %s: %s", cfg.model, e)
        else:
            log.exception("could not load the teacher model %s", cfg.model)
        await server.stop(grace=None)
        return 1
    batcher = build_batcher(cfg, backend, metrics)
    if ready:
        await batcher.start()
        servicer.attach(backend, batcher)
        info = backend.info
        log.info(
            "serving %s (%s, vocab %d) on %s:%d | OpenMP wait policy %s", info.model, info.backend,
            info.vocab_size, cfg.host, port, os.environ.get("OMP_WAIT_POLICY") or "default",
        )  # fmt: skip
        await _set_health(health, health_pb2.HealthCheckResponse.SERVING)  # after the line: a watcher sees it
        await stop.wait()
    await _drain(cfg, server, health, servicer, batcher, backend)
    return 0


async def _drain(
    cfg: ServeConfig,
    server: grpc.aio.Server,
    health,
    servicer: TeacherServicer,
    batcher: MicroBatcher,
    backend: TeacherBackend,
) -> None:
    """Health NOT_SERVING, let in-flight Teacher calls finish, then stop the server and the engine."""
    log.info("stopping: draining in-flight requests (at most %.0f s)", cfg.drain_timeout_s)
    await health.enter_graceful_shutdown()  # every service NOT_SERVING, and it stays so
    if not await servicer.drain(cfg.drain_timeout_s):
        log.warning("drain timeout (%.0f s): cancelling the calls still in flight", cfg.drain_timeout_s)
    # A short grace for what is not a Teacher call (health watchers, reflection), then cancel.
    await server.stop(grace=1.0)
    servicer.close()  # data-plane sessions: their peers see the groups go
    await batcher.close()
    await backend.close()
    log.info("stopped")
