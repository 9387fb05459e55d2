"""How the teacher client uses gRPC: one channel over every replica, gRPC's own balancing, health checking and
retries, and the TeacherError classes its calls raise. No I/O here: client.py makes the calls.

    target = channel_target(["10.0.0.1:50051", "10.0.0.2:50051"])   # "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    options = channel_options(...) + [("grpc.service_config", service_config(max_retries=3, ...))]
    err = error_from_rpc(rpc_error, target, "Score")                # TeacherOverloadedError, ... (.retryable)

Balancing and failover are gRPC's: the `round_robin` policy spreads calls over every replica's connection,
client-side health checking (the servers' `grpc.health.v1` status of `asymkd.v1.Teacher`) takes a replica
that is loading or draining out of the rotation, and the `retryPolicy` retries UNAVAILABLE and
RESOURCE_EXHAUSTED with exponential backoff (randomized by gRPC) on the next pick, within the call's deadline,
for a call that has received no response yet: unary calls, and streams that have not answered anything. A
server that refuses what no retry can fix sends the pushback `grpc-retry-pushback-ms: -1` (asymkd.contract),
which gRPC honours; the client reads the same trailer to tell the caller `retryable=False`.

Targets: one target is given to gRPC as is (`host:port`, or a URI such as `dns:///teacher-headless:50051`,
which gRPC re-resolves, so every pod behind a headless Kubernetes Service is balanced over). Several
`host:port` targets become one `ipv4:`/`ipv6:` address list; host names among them are resolved once, here.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Sequence

import grpc

from asymkd.contract import RETRY_PUSHBACK_KEY

SERVICE = "asymkd.v1.Teacher"
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# gRPC core's own message-size refusal is RESOURCE_EXHAUSTED without any metadata: retrying cannot help.
_TOO_LARGE = "larger than max"
# grpc.aio reports a write to a stream call that has just ended (peer gone, or the server ended the stream)
# as INTERNAL "Internal error from Core", overwriting the real status
# (https://github.com/grpc/grpc/issues/36066): the cause is unknown, so the caller may send the request again
# (a bad request then fails with its own status).
_MASKED_WRITE_FAILURE = "Internal error from Core"
_URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
# gRPC caps a retry policy's maxAttempts at 5 (gRFC A6).
MAX_ATTEMPTS = 5


# ----------------------------------------------------------------------------------------- channel set-up
def _split_host_port(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(
            f"teacher target {target!r} is not host:port or a gRPC URI ({', '.join(_URI_SCHEMES)})"
        )
    return host.strip("[]"), int(port)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"teacher target {host}:{port}: cannot resolve {host!r} ({e})") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def channel_target(targets: Sequence[str]) -> str:
    """The one gRPC target that covers every replica (see the module docstring)."""
    if not targets:
        raise ValueError("the teacher client needs at least one target address")
    if len(targets) == 1:
        return targets[0]
    uris = [t for t in targets if t.startswith(_URI_SCHEMES)]
    if uris:
        raise ValueError(f"a gRPC URI target ({uris[0]!r}) must be the only target: it names every replica")
    resolved = []
    for t in targets:
        host, port = _split_host_port(t)
        resolved.append((port, _addresses(host, port)))
    for version, scheme in ((4, "ipv4:"), (6, "ipv6:")):
        per_target = [[a for a in addrs if a.version == version] for _, addrs in resolved]
        if all(per_target):
            fmt = "{}:{}" if version == 4 else "[{}]:{}"
            addresses = [
                fmt.format(a, port)
                for (port, _), addrs in zip(resolved, per_target, strict=True)
                for a in addrs
            ]
            return scheme + ",".join(dict.fromkeys(addresses))
    raise ValueError(f"teacher targets {list(targets)} mix IPv4-only and IPv6-only addresses")


def service_config(max_retries: int, backoff_base_s: float, backoff_max_s: float) -> str:
    """gRPC service config: round_robin over the replicas, health-checked, with the retry policy."""
    config: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    attempts = min(max_retries + 1, MAX_ATTEMPTS)
    if attempts > 1:  # a retry policy needs maxAttempts >= 2
        policy = {
            "maxAttempts": attempts,
            "initialBackoff": f"{backoff_base_s:.3f}s",
            "maxBackoff": f"{max(backoff_max_s, backoff_base_s):.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": sorted(c.name for c in RETRYABLE_CODES),
        }
        config["methodConfig"] = [{"name": [{"service": SERVICE}], "retryPolicy": policy}]
    return json.dumps(config)


def channel_options(
    max_message_bytes: int, keepalive_s: float, service_config_json: str
) -> list[tuple[str, int | str]]:
    """Message limits both ways (gRPC's default receive limit is 4 MiB); keepalive pings on active calls only
    (a silently dead peer is detected within ~keepalive_s + 20 s); reconnect backoff capped at 2 s (gRPC's
    default grows to 120 s, which would keep a restarted teacher unused); the service config."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.service_config", service_config_json),
    ]


# ------------------------------------------------------------------------------------------------- errors
def pushback_ms(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The server's `grpc-retry-pushback-ms` trailer as an int (negative: do not retry); None when absent."""
    for key, value in metadata or ():
        if key == RETRY_PUSHBACK_KEY:
            value = value.decode() if isinstance(value, bytes) else value
            try:
                return int(value)
            except ValueError:
                return -1  # unparseable: gRPC reads it as "do not retry" too
    return None


def is_retryable(
    code: grpc.StatusCode, details: str = "", metadata: Iterable[tuple[str, str | bytes]] | None = None
) -> bool:
    """May the same request succeed if sent again (later, or to another replica)? UNAVAILABLE and
    RESOURCE_EXHAUSTED unless the server's pushback says no; grpc.aio's masked stream-write failure."""
    if code == grpc.StatusCode.INTERNAL and details == _MASKED_WRITE_FAILURE:
        return True
    if code not in RETRYABLE_CODES:
        return False
    pushback = pushback_ms(metadata)
    if pushback is not None:
        return pushback >= 0
    return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details)


class TeacherError(RuntimeError):
    """A failed teacher call: `code` (grpc.StatusCode), `details` (the server's message), `address`, `method`,
    and `retryable` (is_retryable's verdict)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        address: str = "",
        method: str = "",
        retryable: bool | None = None,
    ):
        super().__init__(f"{method or 'teacher RPC'} on {address or '?'} failed: {code.name}: {details}")
        self.code, self.details, self.address, self.method = code, details, address, method
        self.retryable = is_retryable(code, details) if retryable is None else retryable


class InvalidRequestError(TeacherError):
    """INVALID_ARGUMENT / OUT_OF_RANGE / FAILED_PRECONDITION: the details name the offending field."""


class TeacherUnavailableError(TeacherError):
    """UNAVAILABLE on every attempt (every replica down, loading or draining); also grpc.aio's masked stream
    failure (code INTERNAL, "Internal error from Core": a write to a stream whose peer just went away)."""


class TeacherOverloadedError(TeacherError):
    """RESOURCE_EXHAUSTED: queue full on every attempt, or the request/response is too large."""


class TeacherTimeoutError(TeacherError):
    """DEADLINE_EXCEEDED: no answer within `timeout_s`."""


class UnsupportedError(TeacherError):
    """UNIMPLEMENTED: e.g. a signal this backend does not compute."""


_ERROR_CLASSES = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequestError,
    grpc.StatusCode.UNAVAILABLE: TeacherUnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TeacherOverloadedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: TeacherTimeoutError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
}


def make_error(
    code: grpc.StatusCode,
    details: str,
    address: str = "",
    method: str = "",
    metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> TeacherError:
    retryable = is_retryable(code, details, metadata)
    if code == grpc.StatusCode.INTERNAL and details == _MASKED_WRITE_FAILURE:
        return TeacherUnavailableError(code, details, address, method, retryable)  # most likely the peer left
    return _ERROR_CLASSES.get(code, TeacherError)(code, details, address, method, retryable)


def error_from_rpc(err: grpc.RpcError, address: str = "", method: str = "") -> TeacherError:
    """The TeacherError for a grpc.RpcError (raise it `from err` to keep the original)."""
    trailing = getattr(err, "trailing_metadata", None)  # grpc.RpcError itself does not promise one
    return make_error(err.code(), err.details() or "", address, method, trailing() if trailing else None)
