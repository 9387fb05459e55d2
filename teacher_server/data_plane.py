"""The tensor data plane, teacher side: a torch.distributed pair group between this server and each student rank.

    plane = DataPlaneServer(host="127.0.0.1", device=torch.device("cpu"))
    offer = plane.open("gloo")                   # the OpenDataPlane answer: store address, session, one-time token
    refs = plane.detach_remote(offer.session, scores)   # FULL / HIDDEN rows of a request -> RemoteRefs (gRPC)
    plane.close()

Why: FULL rows are V values per token (300 KB at V = 150k in bf16), too big for protobuf messages; they go
straight from this process to the rank that asked, over a group made for that pair only (not the student's
FSDP group), while the request, the shapes, dtypes and status stay on gRPC. The pattern is TRL's `vllm-serve`
weight sync (two separately launched jobs joined by vLLM's StatelessProcessGroup + PyNcclCommunicator), built
on torch.distributed: one TCPStore served by this process, a PrefixStore per session, and per session a gloo
group for control (+ the data on CPU) and, for CUDA tensors, an NCCL group for the data. The code path is the
same for both; only the data group's class differs. (NCCL is written but untested here: no GPU.)

Protocol of one session (student = rank 1, this server = rank 0; `pair_groups` builds the groups):
1. OpenDataPlane answers {session, store host/port, token (32 random bytes), backend, timeout_s}; a thread
   waits up to timeout_s for the peer to join the group under the session's prefix (the offer is good for one
   rendezvous: the session is gone afterwards, whatever the outcome).
2. Challenge on the new group: the server sends a random nonce, the peer answers HMAC-SHA256(token, nonce),
   the server sends a verdict byte. A peer without the token (one that found the store and raced for the
   prefix) is refused and the session torn down; the token itself never travels outside the gRPC answer.
3. Pull: for each RemoteRef it got over gRPC, the peer sends a control message (FETCH, tag) and receives the
   tensor; the server sends tensors in the order asked, so the two sides can never wait on each other.
   Results wait in the session until fetched, bounded: the oldest are dropped beyond `max_pending` tensors or
   `max_pending_bytes`, and so is a result made more than `timeout_s` before one the peer fetches (its answer
   was lost with a broken call: the student sends that batch again). A later FETCH of a dropped tag ends the
   session, and the student opens a new one.
4. A peer that dies (SIGKILL, OOM) closes its sockets: the pending receive fails at once, the session is torn
   down and its tensors freed; a silent peer is given up after `idle_timeout_s`. Other sessions and the gRPC
   service never wait on it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from datetime import timedelta

import torch

from asymkd.contract import DataPlaneOffer, SequenceScores
from asymkd.remote import RemoteRef

log = logging.getLogger("asymkd.teacher.data_plane")

OP_FETCH, OP_CLOSE = 1, 2
TAG_CTRL, TAG_DATA, TAG_AUTH = 11, 12, 13
NONCE_BYTES = 32
REMOTE_FIELDS = ("full", "hidden")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


class SessionClosed(RuntimeError):
    """The data-plane session is not open (never was, refused, torn down, or on another replica)."""


# ------------------------------------------------------------------------------------- shared with the peer
def pair_groups(store, session: str, rank: int, backend: str, timeout_s: float):
    """(control group, data group) of one session: gloo for control; the data group is the same gloo group on
    CPU, an NCCL group for CUDA tensors (the caller has set its current CUDA device)."""
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    base = dist.PrefixStore(f"asymkd-dp/{session}/", store)
    ctrl = dist.ProcessGroupGloo(dist.PrefixStore("ctrl/", base), rank, 2, timeout)
    if backend == "gloo":
        return ctrl, ctrl
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return ctrl, dist.ProcessGroupNCCL(dist.PrefixStore("data/", base), rank, 2, options)


def challenge_answer(token: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, nonce, hashlib.sha256).digest()


def send_tensor(pg, t: torch.Tensor, peer: int, tag: int, timeout_s: float) -> None:
    pg.send([t], peer, tag).wait(timedelta(seconds=timeout_s))


def recv_tensor(pg, t: torch.Tensor, peer: int, tag: int, timeout_s: float) -> torch.Tensor:
    pg.recv([t], peer, tag).wait(timedelta(seconds=timeout_s))
    return t


def bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------- server
class Session:
    """One pair: its thread runs the rendezvous, the challenge and then serves FETCHes until the peer goes."""

    def __init__(self, plane: DataPlaneServer, name: str, token: bytes, backend: str) -> None:
        self.plane, self.name, self.token, self.backend = plane, name, token, backend
        self.pending: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.put_at: dict[int, float] = {}
        self.pending_bytes = 0
        self.issued = 0  # tags handed out so far (0, 1, ...)
        self.cond = threading.Condition()
        self.closed = False
        self.sent_bytes = 0
        self.thread = threading.Thread(target=self._run, name=f"data-plane-{name}", daemon=True)

    def put(self, t: torch.Tensor) -> int:
        """Hold `t` until the peer fetches it; returns its tag. Raises SessionClosed."""
        t = t.contiguous() if self.backend == "gloo" else t.to(self.plane.device).contiguous()
        nbytes = t.numel() * t.element_size()
        with self.cond:
            if self.closed:
                raise SessionClosed(f"data_plane_session {self.name!r} closed (its peer went away)")
            tag, self.issued = self.issued, self.issued + 1
            self.pending[tag] = t
            self.put_at[tag] = time.monotonic()
            self.pending_bytes += nbytes
            limits = self.plane.max_pending, self.plane.max_pending_bytes
            while len(self.pending) > limits[0] or self.pending_bytes > limits[1]:
                self._drop(next(iter(self.pending)), "over the pending limits")
            self.cond.notify_all()
        return tag

    def _drop(self, tag: int, why: str) -> None:
        old = self.pending.pop(tag)
        self.put_at.pop(tag, None)
        self.pending_bytes -= old.numel() * old.element_size()
        log.warning("session %s: dropped unfetched tensor %d (%s)", self.name, tag, why)

    def _take(self, tag: int, timeout_s: float) -> torch.Tensor:
        with self.cond:
            held = self.cond.wait_for(
                lambda: tag in self.pending or tag < self.issued or self.closed, timeout_s
            )
            if not held or tag not in self.pending:
                raise SessionClosed(f"tag {tag} is not held (dropped, or never sent)")
            t = self.pending.pop(tag)
            self.pending_bytes -= t.numel() * t.element_size()
            made = self.put_at.pop(tag)
            for old in [k for k, at in self.put_at.items() if at < made - timeout_s]:
                self._drop(old, "its answer was lost: older than a fetched one by more than timeout_s")
            return t

    def _run(self) -> None:
        timeout_s = self.plane.timeout_s
        if self.backend == "nccl":
            torch.cuda.set_device(self.plane.device)
        try:
            ctrl, data = pair_groups(self.plane.store, self.name, 0, self.backend, timeout_s)
        except Exception as e:  # nobody came within the deadline, or the rendezvous broke
            log.warning("session %s: no peer joined (%s)", self.name, str(e).splitlines()[0][:200])
            return self._close()
        try:
            if not self._authenticate(ctrl, timeout_s):
                log.warning("session %s: peer refused (wrong token)", self.name)
                return
            log.info("session %s: peer joined (%s)", self.name, self.backend)
            self._serve(ctrl, data, timeout_s)
        except Exception as e:  # the peer died or hung: its sockets closed, or a timeout
            log.warning("session %s: peer gone (%s)", self.name, str(e).splitlines()[0][:200])
        finally:
            self._close()
            for pg in {id(ctrl): ctrl, id(data): data}.values():
                pg.abort()

    def _authenticate(self, ctrl, timeout_s: float) -> bool:
        nonce = secrets.token_bytes(NONCE_BYTES)
        send_tensor(ctrl, bytes_tensor(nonce), 1, TAG_AUTH, timeout_s)
        answer = recv_tensor(ctrl, torch.zeros(32, dtype=torch.uint8), 1, TAG_AUTH, timeout_s)
        ok = hmac.compare_digest(bytes(answer.tolist()), challenge_answer(self.token, nonce))
        send_tensor(ctrl, torch.tensor([int(ok)], dtype=torch.uint8), 1, TAG_AUTH, timeout_s)
        return ok

    def _serve(self, ctrl, data, timeout_s: float) -> None:
        msg = torch.zeros(2, dtype=torch.int64)
        while True:
            recv_tensor(ctrl, msg, 1, TAG_CTRL, self.plane.idle_timeout_s)
            op, tag = msg.tolist()
            if op == OP_CLOSE:
                log.info("session %s: closed by the peer (%.1f MB sent)", self.name, self.sent_bytes / 1e6)
                return
            if op != OP_FETCH:
                raise ValueError(f"unknown control op {op}")
            t = self._take(tag, timeout_s)
            send_tensor(data, t, 1, TAG_DATA, timeout_s)
            self.sent_bytes += t.numel() * t.element_size()

    def _close(self) -> None:
        with self.cond:
            self.closed = True
            self.pending.clear()
            self.put_at.clear()
            self.pending_bytes = 0
            self.cond.notify_all()
        self.plane._forget(self.name)


class DataPlaneServer:
    """Sessions with student ranks; the TCPStore starts with the first session (on `host`, any free port)."""

    def __init__(
        self,
        host: str,
        device: torch.device | str = "cpu",
        *,
        timeout_s: float = 60.0,
        idle_timeout_s: float = 1800.0,
        max_pending: int = 64,
        max_pending_bytes: int = 8 << 30,
    ) -> None:
        self.host, self.device = host, torch.device(device)
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        self.max_pending, self.max_pending_bytes = max_pending, max_pending_bytes
        self.store = None
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @staticmethod
    def available_backends(device: torch.device) -> tuple[str, ...]:
        import torch.distributed as dist

        if not dist.is_available():
            return ()
        cuda = device.type == "cuda" and dist.is_nccl_available()
        return ("gloo", "nccl") if cuda else ("gloo",)

    def open(self, backend: str) -> DataPlaneOffer:
        """A new session for one peer (see the module docstring); ValueError for a backend not offered."""
        backend = backend or "gloo"
        offered = self.available_backends(self.device)
        if backend not in offered:
            raise ValueError(
                f"backend: {backend!r} is not offered by this teacher on {self.device} ({offered})"
            )
        with self._lock:
            if self.store is None:
                self.store = self._start_store()
            name = secrets.token_hex(8)
            session = Session(self, name, secrets.token_bytes(32), backend)
            self.sessions[name] = session
        session.thread.start()
        host = "" if self.host in _WILDCARD_HOSTS else self.host
        return DataPlaneOffer(name, host, self.store.port, session.token, backend, self.timeout_s)

    def _start_store(self):
        import torch.distributed as dist

        bind = "0.0.0.0" if self.host in _WILDCARD_HOSTS else self.host
        store = dist.TCPStore(
            bind, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=self.timeout_s)
        )
        log.info("data plane: TCPStore on %s:%d", bind, store.port)
        return store

    def session(self, name: str) -> Session:
        s = self.sessions.get(name)
        if s is None:
            raise SessionClosed(
                f"data_plane_session {name!r} is not open on this teacher (its peer went away, or another "
                "replica opened it): open a new one with OpenDataPlane"
            )
        return s

    def detach_remote(self, name: str, scores: list[SequenceScores]) -> list[RemoteRef]:
        """Move the FULL / HIDDEN rows of a request's results into session `name` (one tensor per field, every
        sequence's rows in order); the results keep their small fields. Raises SessionClosed."""
        session = self.session(name)
        refs = []
        for field in REMOTE_FIELDS:
            parts = [getattr(s, field) for s in scores]
            if any(p is None for p in parts):
                continue
            rows = parts[0] if len(parts) == 1 else torch.cat(parts)
            for s in scores:
                setattr(s, field, None)
            refs.append(RemoteRef(field, rows.dtype, tuple(rows.shape), session.put(rows)))
        return refs

    def _forget(self, name: str) -> None:
        with self._lock:
            self.sessions.pop(name, None)

    def close(self) -> None:
        """Close every session (their peers see the group go) and the store."""
        for s in list(self.sessions.values()):
            s._close()
        self.store = None
