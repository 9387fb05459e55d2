"""Start a teacher server as a child process and wait until its health check says SERVING.

Used by `asymkd run`, the integration tests and the benchmarks:

    with LocalTeacher(["--model", str(model_dir), "--backend", "hf"]) as teacher:
        client = TeacherClient([teacher.address])

A server started with `--tls-cert/--tls-key` (and `--tls-client-ca`) is health-checked over TLS: give
LocalTeacher the CA that signed its certificate (`tls_ca`) and, for mutual TLS, a client certificate
(`tls_cert`, `tls_key`); `tls_server_name` when the certificate names another host than `host`. Health
needs no token, so `--auth-token-file` needs nothing here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from teacher_server.security import ClientSecurity

log = logging.getLogger("asymkd.launch")
SERVICE_NAME = "asymkd.v1.Teacher"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_status(
    address: str, service: str = "", timeout_s: float = 2.0, security: ClientSecurity | None = None
) -> int | None:
    """The server's health status for `service` (a HealthCheckResponse enum), or None when unreachable
    (or when the TLS handshake fails). `security`: TLS credentials for a TLS server (None = plaintext)."""
    try:
        with (security or ClientSecurity()).channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            return reply.status
    except grpc.RpcError:
        return None


class LocalTeacher:
    """An `asymkd serve` child process (`python -m asymkd.cli serve ...`) on a loopback port."""

    def __init__(
        self,
        serve_args: list[str],
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 300.0,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.serve_args = list(serve_args)
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.security = ClientSecurity.build(
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name
        )
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> LocalTeacher:
        cmd = [sys.executable, "-m", "asymkd.cli", "serve", *self.serve_args]
        cmd += ["--host", self.host, "--port", str(self.port)]
        out = None
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
            out = self._log_file
        env = {**os.environ, **(self.env or {})}
        log.info("starting teacher: %s", " ".join(cmd))
        # Own process group: stop() can signal the server and any engine workers it spawned.
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT if out else None, env=env, start_new_session=True
        )
        self.wait_serving()
        return self

    def wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"teacher server exited with code {self.proc.returncode} during start-up"
                    + (f" (log: {self.log_path})" if self.log_path else "")
                )
            status = health_status(self.address, SERVICE_NAME, security=self.security)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"teacher at {self.address} not SERVING after {self.start_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL the whole process group if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("teacher did not stop in %.0f s; killing", timeout_s)
        with contextlib.suppress(ProcessLookupError):  # leftovers of the group (engine workers), if any
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def kill(self) -> None:
        """Hard kill (tests of teacher failure): no drain."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> LocalTeacher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
