"""The engine side of the teacher service: what every backend implements, in engine (torch) types.

The servicer converts proto <-> these types and validates requests before they reach a backend, so a
backend may assume: 2 <= len(token_ids) <= max_seq_len, ids in [0, vocab_size), 0 <= score_from <= L-2,
1 <= top_k <= max_top_k for TOP_K, temperature finite and > 0.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from asymkd.v1 import teacher_pb2 as pb


class Signal(enum.IntEnum):
    TOP_K = pb.TOP_K
    TARGET_ONLY = pb.TARGET_ONLY
    AT_IDS = pb.AT_IDS
    SAMPLED = pb.SAMPLED
    FULL = pb.FULL
    HIDDEN = pb.HIDDEN


class BackendError(RuntimeError):
    """An engine failure that is not the caller's fault (maps to INTERNAL)."""


@dataclass(frozen=True)
class ScoreParams:
    """Per-request scoring parameters; requests with equal params may share one engine batch."""

    signal: Signal = Signal.TOP_K
    top_k: int = 0  # TOP_K only
    temperature: float = 1.0
    value_dtype: torch.dtype = torch.float32
    num_samples: int = 0  # SAMPLED only
    seed: int = 0  # SAMPLED only; 0 = server-chosen


@dataclass
class ScoreItem:
    """One sequence to score. `token_ids` (L,) int64; rows score_from..L-2 are returned."""

    token_ids: torch.Tensor
    score_from: int = 0
    at_ids: torch.Tensor | None = None  # AT_IDS: (R, m) int64

    @property
    def num_rows(self) -> int:
        return self.token_ids.numel() - 1 - self.score_from

    @property
    def targets(self) -> torch.Tensor:
        """(R,) the actual next token of each returned row."""
        return self.token_ids[self.score_from + 1 :]


@dataclass
class SeqScores:
    """Teacher signal for one sequence; every tensor has R rows (CPU tensors)."""

    ids: torch.Tensor | None = None  # (R, k) int32
    logprobs: torch.Tensor | None = None  # (R, k)
    tail_logprob: torch.Tensor | None = None  # (R,)
    target_logprob: torch.Tensor | None = None  # (R,)
    full: torch.Tensor | None = None  # (R, V)
    hidden: torch.Tensor | None = None  # (R, H)
    counts: torch.Tensor | None = None  # SAMPLED: (R, m) int32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("ids", "logprobs", "tail_logprob", "target_logprob", "full", "hidden", "counts")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    greedy: bool = False
    top_k_logprobs: int = 0
    stop_token_ids: tuple[int, ...] = ()
    value_dtype: torch.dtype = torch.float32


@dataclass
class GenerateChunk:
    """New tokens of one (prompt, sample) since its previous chunk."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: torch.Tensor  # (n,)
    top_ids: torch.Tensor | None = None  # (n, k) int32
    top_logprobs: torch.Tensor | None = None  # (n, k)
    finished: bool = False
    finish_reason: str = ""


@dataclass
class BackendInfo:
    model: str
    backend: str
    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_top_k: int
    tokenizer_hash: str
    dtype: str
    signals: tuple[Signal, ...]
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    eos_token_ids: tuple[int, ...] = ()
    tokenizer_vocab_size: int = 0
    extra: dict = field(default_factory=dict)


class UnsupportedSignal(NotImplementedError):
    """A known signal this backend does not implement (maps to UNIMPLEMENTED)."""


class TeacherBackend(abc.ABC):
    """An inference engine for one teacher model. Methods are async; blocking engines use a worker thread."""

    info: BackendInfo

    async def start(self) -> None:  # noqa: B027  (optional hook)
        """Load and warm up; health turns SERVING only after this returns."""

    @abc.abstractmethod
    async def score(self, items: list[ScoreItem], params: ScoreParams) -> list[SeqScores]:
        """Score every item (one SeqScores per item, in order)."""

    @abc.abstractmethod
    def generate(self, prompts: list[torch.Tensor], params: GenerateParams) -> AsyncIterator[GenerateChunk]:
        """Sample continuations; yields chunks as tokens are produced; the last chunk per sample is finished."""

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release the engine (worker processes, memory)."""
