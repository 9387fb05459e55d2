"""The types both sides of the teacher service share, defined once: what a teacher is, what it answers.

    from asymkd.contract import Signal, TeacherInfo, SequenceScores, GenerateChunk, GeneratedSample
    info.signals          # (Signal.TOP_K, ...)      the teacher's facts: GetInfo on the client, a backend's own
    info.id_encodings, info.data_planes, info.output_layer   # what the server offers beyond the signals
    s = SequenceScores(ids=..., logprobs=..., tail_logprob=...)   # one sequence's rows, client or engine side
    tokenizer_hash(model_dir)                        # the fingerprint teacher and student compare

A backend produces these types, the servicer encodes them (asymkd/wire.py), the client decodes them into
the same types, and the student's teacher sources consume them. Request parameters are not here: the client
builds requests (teacher_server/client.py), the server parses them into its engine types
(teacher_server/validation.py, backends/base.py).

Retry metadata: a refusal that no retry can fix (a request or response over the size limits) carries gRPC's
own server pushback, the trailing metadata `grpc-retry-pushback-ms: -1`, which tells gRPC's retry machinery
not to retry (gRFC A6) and tells asymkd's client and teacher feed that the error is permanent. A full queue
carries none: it is worth retrying.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from asymkd.v1 import teacher_pb2 as pb

if TYPE_CHECKING:
    from torch import Tensor

# gRPC's server-pushback key; a negative value means "do not retry this call" (gRFC A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
NO_RETRY_METADATA = ((RETRY_PUSHBACK_KEY, "-1"),)


class Signal(enum.IntEnum):
    """What a teacher returns per scored row (the proto's `Signal`)."""

    TOP_K = pb.TOP_K
    TARGET_ONLY = pb.TARGET_ONLY
    AT_IDS = pb.AT_IDS
    SAMPLED = pb.SAMPLED
    FULL = pb.FULL
    HIDDEN = pb.HIDDEN


class IdEncoding(enum.IntEnum):
    """How ids and counts travel (the proto's `IdEncoding`): int32, or packed to ceil(log2 V) bits."""

    INT32_IDS = pb.INT32_IDS
    PACKED_IDS = pb.PACKED_IDS


class DataPlane(enum.IntEnum):
    """Where FULL / HIDDEN rows travel (the proto's `DataPlane`): in gRPC messages, or over a torch pair group."""

    GRPC = pb.GRPC
    TORCH = pb.TORCH


@dataclass(frozen=True)
class DataPlaneOffer:
    """An OpenDataPlane answer (the proto's `DataPlaneOffer`): join the TCPStore at store_host:store_port
    (store_host "" = the host the gRPC server was reached at) as rank 1 of session `session`, then answer the
    challenge with `token`; good for one rendezvous within timeout_s."""

    session: str
    store_host: str
    store_port: int
    token: bytes
    backend: str
    timeout_s: float


@dataclass(frozen=True)
class OutputLayerInfo:
    """The teacher's output layer as GetOutputLayer serves it (the proto's `OutputLayerInfo`): logits =
    softcap·tanh(scale·(h @ W.T + b) / softcap) (no tanh when softcap is 0); `fingerprint` = blake2b-128 of the
    bytes sent with these extras (asymkd.wire.output_layer_fingerprint)."""

    fingerprint: str = ""
    dtype: str = ""
    logit_scale: float = 1.0
    logit_softcap: float = 0.0
    has_bias: bool = False


@dataclass(frozen=True)
class TeacherInfo:
    """A teacher's facts (the proto's `TeacherInfo`; every field has the proto's default).

    A backend fills the model facts; the server adds its caps (`max_request_tokens`, `max_message_bytes`, and
    `max_top_k` capped at the vocabulary) before answering GetInfo. `dtype` is a name such as "float32".
    `note` is the backend's word on what it serves, quoted in refusals; it does not travel."""

    model: str = ""
    backend: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    max_seq_len: int = 0
    max_top_k: int = 0
    tokenizer_hash: str = ""
    dtype: str = ""
    signals: tuple[Signal, ...] = ()
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    eos_token_ids: tuple[int, ...] = ()
    tokenizer_vocab_size: int = 0
    max_request_tokens: int = 0
    max_message_bytes: int = 0
    value_dtypes: tuple[int, ...] = ()  # proto DType values accepted as ScoreRequest.value_dtype
    id_encodings: tuple[IdEncoding, ...] = ()
    data_planes: tuple[DataPlane, ...] = ()
    output_layer: OutputLayerInfo | None = None
    note: str = ""


@dataclass
class SequenceScores:
    """Teacher signal for one sequence, R rows (R = L-1-score_from; row t predicts token t+1); absent fields
    are None.

    ids (R, k) (TOP_K; SAMPLED ids, -1 padded); logprobs (R, k) (TOP_K, AT_IDS, SAMPLED: -inf on padding);
    tail_logprob (R,) = log of the mass outside the top-k (AT_IDS: outside the asked ids); target_logprob (R,);
    full (R, V); hidden (R, H); counts (R, m) (SAMPLED).
    Values in the request's value dtype. Integer fields travel as int32; the client widens ids to int64
    (ready for torch.gather), a backend may hand over int32."""

    ids: Tensor | None = None
    logprobs: Tensor | None = None
    tail_logprob: Tensor | None = None
    target_logprob: Tensor | None = None
    full: Tensor | None = None
    hidden: Tensor | None = None
    counts: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are present, by name, in field order."""
        return {n: t for n in SCORE_FIELDS if (t := getattr(self, n)) is not None}

    @property
    def num_rows(self) -> int:
        return next((t.shape[0] for t in self.tensors().values()), 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


SCORE_FIELDS = tuple(f.name for f in fields(SequenceScores))


@dataclass
class GenerateChunk:
    """New tokens of one (prompt, sample) since its previous chunk: token_ids, their logprobs (n,) at the
    request's temperature, top_ids (n, k) / top_logprobs (n, k) when per-token top-k was asked for; the last
    chunk of a sample is `finished`, with its finish_reason. `text`: with return_text, the sample's decoded
    text new since its previous chunk (may be "" while a character is incomplete)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    finished: bool = False
    finish_reason: str = ""
    text: str = ""


@dataclass
class GeneratedSample:
    """One whole sampled continuation (its chunks concatenated): token_ids (T,) int64, logprobs (T,),
    top_ids (T, k) int64 / top_logprobs (T, k) when per-token top-k was asked for, finish_reason, and `text`
    (the decoded continuation) when return_text was asked for."""

    token_ids: Tensor
    logprobs: Tensor
    top_ids: Tensor | None = None
    top_logprobs: Tensor | None = None
    finish_reason: str = ""
    text: str = ""


def tokenizer_hash(model_dir: str | Path) -> str:
    """A fingerprint of a folder's tokenizer (vocab, merges, normalization, special tokens); "" if none.

    Teacher and student must tokenize identically for token-level KD; this is what GetInfo reports and the
    student checks. Padding/truncation settings are excluded: they do not change token ids.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return ""
    spec = json.loads(path.read_text())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    blob = json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
