"""Failure policy of the teacher client: the TeacherError classes, which failures to retry, backoff, and the
balancer that picks a replica. No I/O here: client.py applies these decisions to its calls.

    try:
        ...
    except grpc.aio.AioRpcError as e:
        err = error_from_rpc(e, address, "Score")   # TeacherOverloadedError, ..., with err.retryable
        delay = backoff_s(attempt, base_s=0.05, max_s=2.0)

Retry: UNAVAILABLE, and RESOURCE_EXHAUSTED unless the request itself is too big. The server says so in the
trailing metadata ("asymkd-retryable", "false"); the details text is only matched when that is absent (older
servers, and gRPC core's own message-size refusal, which carries no metadata).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable

import grpc

from teacher_server.validation import RETRYABLE_METADATA_KEY

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# RESOURCE_EXHAUSTED also means "this request is too big": retrying cannot help. Without the metadata flag,
# gRPC core's message-size refusal and older servers' token/message budget refusals say so in their details.
_PERMANENT_EXHAUSTION = ("larger than max", "max-request-tokens", "message limit")
_MASKED_WRITE_FAILURE = "Internal error from Core"


# ----------------------------------------------------------------------------------------- retry rules
def retryable_flag(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool | None:
    """The server's ("asymkd-retryable", "true"/"false") trailing metadata as a bool; None when absent."""
    for key, value in metadata or ():
        if key == RETRYABLE_METADATA_KEY:
            value = value.decode() if isinstance(value, bytes) else value
            return value.strip().lower() != "false"
    return None


def is_retryable(
    code: grpc.StatusCode, details: str = "", metadata: Iterable[tuple[str, str | bytes]] | None = None
) -> bool:
    """UNAVAILABLE always; RESOURCE_EXHAUSTED unless the request itself is too large; nothing else.

    `metadata` (the call's trailing metadata) is asked first; `details` is matched only without the flag."""
    if code not in RETRYABLE_CODES:
        return False
    flag = retryable_flag(metadata)
    if flag is not None:
        return flag
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return not any(p in details for p in _PERMANENT_EXHAUSTION)
    return True


def stream_retry_decision(
    code: grpc.StatusCode, details: str, metadata: Iterable[tuple[str, str | bytes]] | None = None
) -> tuple[bool, bool]:
    """(resend elsewhere?, mark the replica down?) for a ScoreStream call that ended with requests unanswered.

    grpc.aio reports a write to a call that has just ended (peer gone, or the server ended the stream) as
    INTERNAL "Internal error from Core", overwriting the real status (https://github.com/grpc/grpc/issues/36066):
    the cause is unknown, so the requests are resent; a bad request fails again there with its own status."""
    if code == grpc.StatusCode.INTERNAL and details == _MASKED_WRITE_FAILURE:
        return True, False
    return is_retryable(code, details, metadata), code == grpc.StatusCode.UNAVAILABLE


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1, 2, ...): base·2^(attempt-1) capped at max_s, "equal jitter"
    (half fixed, half uniform) so that clients failed over together do not retry in lockstep."""
    cap = min(max_s, base_s * 2 ** max(attempt - 1, 0))
    return cap / 2 + (rng or random).uniform(0.0, cap / 2)


# ---------------------------------------------------------------------------------------------- errors
class TeacherError(RuntimeError):
    """A failed teacher RPC: `code` (grpc.StatusCode), `details` (the server's message), `address`, and
    `retryable` (is_retryable's verdict, from the server's metadata flag when it sent one)."""

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
    """UNAVAILABLE on every attempt (all replicas down or draining)."""


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
    return _ERROR_CLASSES.get(code, TeacherError)(code, details, address, method, retryable)


def error_from_rpc(err: grpc.RpcError, address: str = "", method: str = "") -> TeacherError:
    """The TeacherError for a grpc.RpcError (raise it `from err` to keep the original)."""
    trailing = getattr(err, "trailing_metadata", None)  # grpc.RpcError itself does not promise one
    return make_error(err.code(), err.details() or "", address, method, trailing() if trailing else None)


# ------------------------------------------------------------------------------------------- balancing
class Balancer:
    """Picks a replica: least outstanding requests among the healthy ones, round-robin among ties.

    A replica marked down sits out `cooldown_s` (it is still picked when nothing else is left). `avoid`
    holds the replicas that already failed this call, so a retry goes to the next one."""

    def __init__(self, n: int, cooldown_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if n < 1:
            raise ValueError("the teacher client needs at least one target address")
        self.n, self.cooldown_s, self._clock = n, cooldown_s, clock
        self.outstanding = [0] * n
        self.down_until = [0.0] * n
        self._next = 0

    def pick(self, avoid: Iterable[int] = ()) -> int:
        now, avoid = self._clock(), set(avoid)
        order = [(self._next + j) % self.n for j in range(self.n)]
        up = [i for i in order if self.down_until[i] <= now]
        for pool in ([i for i in up if i not in avoid], [i for i in order if i not in avoid], up):
            if pool:
                break
        else:  # everything down and already tried: the one that comes back first
            pool = [min(order, key=lambda i: self.down_until[i])]
        best = min(pool, key=lambda i: self.outstanding[i])  # first of the rotation among ties
        self._next = (best + 1) % self.n
        return best

    def acquire(self, i: int) -> None:
        self.outstanding[i] += 1

    def release(self, i: int) -> None:
        self.outstanding[i] -= 1

    def mark_down(self, i: int) -> None:
        self.down_until[i] = self._clock() + self.cooldown_s

    def mark_up(self, i: int) -> None:
        self.down_until[i] = 0.0
