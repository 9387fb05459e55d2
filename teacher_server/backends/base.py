"""The engine side of the teacher service: what every backend implements, in engine (torch) types.

The servicer converts proto <-> these types and validates requests before they reach a backend, so a
backend may assume: 2 <= len(token_ids) <= max_seq_len, ids in [0, vocab_size), 0 <= score_from <= L-2,
1 <= top_k <= max_top_k for TOP_K, temperature finite and > 0. Results and facts are the contract types
both sides share (asymkd/contract.py): SequenceScores, GenerateChunk, TeacherInfo.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from asymkd.contract import GenerateChunk, SequenceScores, Signal, TeacherInfo


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


@dataclass(frozen=True)
class GenerateParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sampling: keep the top_k most likely tokens; 0 = all
    n: int = 1
    seed: int | None = None
    greedy: bool = False
    top_k_logprobs: int = 0
    stop_token_ids: tuple[int, ...] = ()
    value_dtype: torch.dtype = torch.float32


class UnsupportedSignal(NotImplementedError):
    """A known signal this backend does not implement (maps to UNIMPLEMENTED)."""


class TeacherBackend(abc.ABC):
    """An inference engine for one teacher model. Methods are async; blocking engines use a worker thread."""

    info: TeacherInfo  # the model facts (the server adds its own caps before answering GetInfo)
    tokenizer = None  # the model's transformers tokenizer once started, if it has one (Generate text prompts)

    async def start(self) -> None:  # noqa: B027  (optional hook)
        """Load and warm up; health turns SERVING only after this returns."""

    @abc.abstractmethod
    async def score(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        """Score every item (one SequenceScores per item, in order)."""

    @abc.abstractmethod
    def generate(self, prompts: list[torch.Tensor], params: GenerateParams) -> AsyncIterator[GenerateChunk]:
        """Sample continuations; yields chunks as tokens are produced; the last chunk per sample is finished."""

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release the engine (worker processes, memory)."""
