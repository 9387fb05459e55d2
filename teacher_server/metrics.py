"""Prometheus metrics of the teacher service, in their own registry (no global state, testable).

    metrics = Metrics()
    port = metrics.serve(host, cfg.metrics_port)     # GET http://host:port/metrics; 0 = any free port
    metrics.observe_request("Score", "OK", seconds)

Tokens per second: `rate(asymkd_teacher_tokens_scored_total[1m])`.
"""

from __future__ import annotations

import errno
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("asymkd.teacher.metrics")

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "asymkd_teacher_requests", "RPCs answered, by method and status code", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "asymkd_teacher_request_latency_seconds",
            "RPC latency (whole call; per request on ScoreStream)",
            ["rpc"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens_scored = Counter("asymkd_teacher_tokens_scored", "Tokens sent to the engine", registry=r)
        self.tokens_generated = Counter("asymkd_teacher_tokens_generated", "Tokens sampled", registry=r)
        self.queue_depth = Gauge(
            "asymkd_teacher_queue_depth", "Score requests waiting for a batch", registry=r
        )
        self.batch_tokens = Histogram(
            "asymkd_teacher_batch_tokens", "Tokens per engine batch", buckets=_BATCH_TOKEN_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "asymkd_teacher_batch_requests",
            "Requests coalesced per engine batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )

    def observe_request(self, rpc: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.latency.labels(rpc=rpc).observe(seconds)

    def observe_batch(self, requests: int, sequences: int, tokens: int) -> None:
        del sequences  # a batch's size is its tokens and requests
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)
        self.tokens_scored.inc(tokens)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint on a daemon thread; returns the bound port. OSError naming the
        address (`cannot listen on HOST:PORT (--metrics-port): the port is taken (...)`) when it cannot bind."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            reason = f"the port is taken ({e})" if e.errno == errno.EADDRINUSE else str(e)
            raise OSError(f"cannot listen on {host}:{port} (--metrics-port): {reason}") from None
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound
