"""The teacher-source interface and the types every source yields (see the package docstring).

class MySource:                       # implements TeacherSource
    depth = 0
    def __iter__(self) -> Iterator[MicroBatch]: ...
    def close(self) -> None: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class TeacherBatch:
    """Teacher answers for one batch, rows aligned with logits[:, :-1] (row t predicts input_ids[:, t+1]).

    TOP_K: ids (B, T-1, k) int64, logprobs (B, T-1, k) float32 (descending), tail_logprob (B, T-1) = log of
    the mass outside the top-k. AT_IDS: the same, ids being the student's own. SAMPLED: ids (B, T-1, m) (-1
    padded), counts (B, T-1, m), logprobs (B, T-1, m) at the ids. target_logprob (B, T-1). FULL: full
    (B, T-1, V) log-probs. HIDDEN: hidden (B, T-1, H) and `head` (teacher_head.TeacherHead, the same object
    for every batch). valid (B, T-1) bool: rows the teacher scored; other rows hold a placeholder (uniform
    over ids 0..k-1, zero hidden state, no draws): mask them out."""

    valid: Tensor
    ids: Tensor | None = None
    logprobs: Tensor | None = None
    tail_logprob: Tensor | None = None
    target_logprob: Tensor | None = None
    full: Tensor | None = None
    hidden: Tensor | None = None
    counts: Tensor | None = None
    head: Any = None  # TeacherHead (hidden signal); not a tensor: `to()` leaves it where it is

    def to(self, device: torch.device | str) -> TeacherBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return TeacherBatch(**moved)


@dataclass
class Resolver:
    """MicroBatch.resolve for AT_IDS: `resolver(ids)` asks the teacher about the student's ids (B, T-1, m),
    which must lie below `teacher_vocab` (None: the student's own width), and returns the TeacherBatch."""

    ask: Callable[[Tensor], TeacherBatch]
    teacher_vocab: int | None = None

    def __call__(self, ids: Tensor) -> TeacherBatch:
        return self.ask(ids)


@dataclass
class MicroBatch:
    """One data batch (`input_ids` (B, T), `loss_mask` (B, T-1), `sample_ids` (B,)) with its teacher answer
    (None without a teacher); wait_ms = how long the training loop waited for it; index = its position in
    the data stream (0, 1, 2, ... from where this run started).

    AT_IDS asks the teacher about the student's own ids, known only after the student's forward: such a
    micro-batch comes with `teacher` holding `valid` only and `resolve(ids)`, which takes the student's ids
    (B, T-1, m), asks the teacher (adding its wait to wait_ms) and returns the whole TeacherBatch."""

    batch: dict[str, Tensor]
    teacher: TeacherBatch | None = None
    wait_ms: float = 0.0
    index: int = -1
    resolve: Resolver | None = None


@dataclass(frozen=True)
class StudentSide:
    """What a source needs to know of the student: its logits width and tokenizer (the handshake), the packed
    row length, its rank and device, and (for the cache) the packed training rows it reads from."""

    vocab_size: int
    tokenizer_hash: str
    seq_len: int = 0
    rank: int = 0
    device: torch.device | str = "cpu"
    rows: object = field(default=None, repr=False)  # data.PackedRows


class TeacherSource(Protocol):
    """Iterate for one MicroBatch per data batch, in order; `depth`: answers ready ahead of the training loop
    (0 = it waits for the teacher); `close()` frees threads, connections, models (safe to call twice)."""

    @property
    def depth(self) -> int: ...

    def __iter__(self) -> Iterator[MicroBatch]: ...

    def close(self) -> None: ...


class NoTeacher:
    """CE-only runs: the batches themselves, no teacher."""

    depth = 0

    def __init__(self, batches: Iterable[dict]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[MicroBatch]:
        return (MicroBatch(b, index=i) for i, b in enumerate(self._batches))

    def close(self) -> None:
        pass
