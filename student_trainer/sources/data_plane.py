"""The tensor data plane, student side: join one session's pair group with the teacher and fetch tensors.

    offer = await client.open_data_plane("gloo")             # gRPC: session, store address, one-time token
    plane = DataPlaneClient(offer, target_host, device)      # blocking: rendezvous + challenge (a thread)
    scores = await client.score_query(query, fetch_remote=plane.fetch_async)   # rows come over the group
    plane.close()

The protocol (teacher_server/data_plane.py): join the teacher's TCPStore as rank 1 of the session, answer its
challenge with HMAC-SHA256(token, nonce), then one FETCH control message per tensor and its receive, one at a
time under a lock, so the teacher sends in exactly the order this side receives (NCCL pairs match sends and
receives by order). The group is this pair's only: it never touches the trainer's FSDP process group. A
teacher that goes away makes the pending receive fail (its sockets close) or time out after the offer's
timeout_s: the fetch raises DataPlaneError, and the teacher feed treats it like a failed call (sends the
batch again, on a new session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import timedelta

import torch

from asymkd.contract import DataPlaneOffer
from asymkd.remote import RemoteRef
from teacher_server.data_plane import (
    NONCE_BYTES,
    OP_CLOSE,
    OP_FETCH,
    TAG_AUTH,
    TAG_CTRL,
    TAG_DATA,
    bytes_tensor,
    challenge_answer,
    pair_groups,
    recv_tensor,
    send_tensor,
)

log = logging.getLogger("asymkd.student.data_plane")


class DataPlaneError(RuntimeError):
    """The pair group could not be joined, was refused, or broke during a transfer."""


class DataPlaneClient:
    """One session's pair group, rank 1 (see the module docstring). `device`: where fetched tensors land
    (CPU for gloo; the rank's GPU for NCCL)."""

    def __init__(self, offer: DataPlaneOffer, target_host: str, device: torch.device | str = "cpu") -> None:
        import torch.distributed as dist

        self.offer, self.device = offer, torch.device(device)
        self.timeout_s = offer.timeout_s
        host = offer.store_host or target_host
        self.received_bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        try:
            if offer.backend == "nccl":
                torch.cuda.set_device(self.device)
            timeout = timedelta(seconds=offer.timeout_s)
            self._store = dist.TCPStore(host, offer.store_port, is_master=False, timeout=timeout)
            self.ctrl, self.data = pair_groups(self._store, offer.session, 1, offer.backend, offer.timeout_s)
            self._answer_challenge(offer.token)
        except DataPlaneError:
            raise
        except Exception as e:
            raise DataPlaneError(f"data plane {host}:{offer.store_port}: could not join ({e})") from e
        log.info(
            "data plane: joined session %s at %s:%d (%s)",
            offer.session,
            host,
            offer.store_port,
            offer.backend,
        )

    def _answer_challenge(self, token: bytes) -> None:
        nonce = recv_tensor(
            self.ctrl, torch.zeros(NONCE_BYTES, dtype=torch.uint8), 0, TAG_AUTH, self.timeout_s
        )
        send_tensor(
            self.ctrl,
            bytes_tensor(challenge_answer(token, bytes(nonce.tolist()))),
            0,
            TAG_AUTH,
            self.timeout_s,
        )
        verdict = recv_tensor(self.ctrl, torch.zeros(1, dtype=torch.uint8), 0, TAG_AUTH, self.timeout_s)
        if int(verdict[0]) != 1:
            raise DataPlaneError(f"data plane session {self.offer.session}: the teacher refused the token")

    def fetch(self, ref: RemoteRef) -> torch.Tensor:
        """The tensor the teacher holds under `ref.tag` (blocking; one transfer at a time)."""
        buf = torch.empty(
            ref.shape, dtype=ref.dtype, device=self.device if self.offer.backend == "nccl" else "cpu"
        )
        with self._lock:
            if self._closed:
                raise DataPlaneError(f"data plane session {self.offer.session} is closed")
            try:
                send_tensor(
                    self.ctrl,
                    torch.tensor([OP_FETCH, ref.tag], dtype=torch.int64),
                    0,
                    TAG_CTRL,
                    self.timeout_s,
                )
                recv_tensor(self.data, buf, 0, TAG_DATA, self.timeout_s)
            except Exception as e:  # the teacher went away, or dropped the tensor and closed the session
                self._closed = True
                raise DataPlaneError(f"data plane session {self.offer.session}: fetch failed ({e})") from e
        self.received_bytes += buf.numel() * buf.element_size()
        return buf

    async def fetch_async(self, ref: RemoteRef) -> torch.Tensor:
        """fetch() on a worker thread (for AsyncTeacherClient's fetch_remote)."""
        return await asyncio.to_thread(self.fetch, ref)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Tell the teacher the session is over (best effort) and drop the groups; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                send_tensor(self.ctrl, torch.tensor([OP_CLOSE, 0], dtype=torch.int64), 0, TAG_CTRL, 5.0)
        for pg in {id(self.ctrl): self.ctrl, id(self.data): self.data}.values():
            with contextlib.suppress(Exception):
                pg.abort()


def target_host(target: str) -> str:
    """The host of a gRPC target (host:port, [v6]:port, dns:///host:port, ipv4:a:p,...): where the teacher's
    TCPStore is when its offer names no host."""
    t = target
    for prefix in ("dns:", "ipv4:", "ipv6:"):
        t = t.removeprefix(prefix)
    if t.startswith("//"):  # dns://authority/host:port
        t = t[2:].split("/", 1)[-1]
    t = t.split(",")[0]
    if t.startswith("["):
        return t[1:].split("]")[0]
    return t.rsplit(":", 1)[0] if t.count(":") == 1 else t


class PlaneLink:
    """The teacher feed's data-plane session: opened at the handshake, dropped after a failure and opened
    again at the next handshake (a restarted teacher knows no old session)."""

    def __init__(self, target: str, device: torch.device | str) -> None:
        self.host = target_host(target)
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.plane: DataPlaneClient | None = None
        self._opening: asyncio.Lock | None = None  # made on the feed's event loop

    @property
    def session(self) -> str:
        return "" if self.plane is None else self.plane.offer.session

    async def ensure(self, client) -> None:
        """An open session with the teacher `client` talks to (a new one if there is none or it broke)."""
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:  # batches in flight wait for one new session, not one each
            if self.plane is not None and not self.plane.closed:
                return
            self.reset()
            offer = await client.open_data_plane(self.backend)
            self.plane = await asyncio.to_thread(DataPlaneClient, offer, self.host, self.device)

    def reset(self, session: str | None = None) -> None:
        """Drop the session (only if it is still `session`, when given: a newer one stays)."""
        if session is not None and session != self.session:
            return
        plane, self.plane = self.plane, None
        if plane is not None:
            plane.close()

    def close(self) -> None:
        self.reset()
