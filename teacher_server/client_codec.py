"""Wire side of the teacher client: the result types, request building, and response decoding/reassembly.

Pure functions of protos and tensors, no I/O (client.py does the calls); `ScoreQuery` is one Score request.

    req = ScoreQuery(seqs, score_from=1, top_k=64).to_proto("req-0")     # pb.ScoreRequest
    results = decode_score_response(resp)                                # list[SequenceScores]
    asm = ScoreAssembly(expected_rows(req)); asm.add(resp) ...; asm.results()   # ScoreStream pieces

Local argument mistakes (unknown signal name, wrong score_from length) raise ValueError; inconsistent
responses (missing rows, a bad sequence_index) raise TeacherError(DATA_LOSS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import grpc
import torch

from asymkd.v1 import teacher_pb2 as pb
from teacher_server.backends.base import GenerateChunk, Signal
from teacher_server.client_policy import TeacherError
from teacher_server.wire import DTYPE_OF_TORCH, VALUE_DTYPES, from_proto, to_proto

TokenIds = Sequence[int] | torch.Tensor


# ------------------------------------------------------------------------------ public result types
@dataclass(frozen=True)
class TeacherInfo:
    """GetInfo, decoded. `signals` as Signal enums, `dtype` a name such as "float32"."""

    model: str
    backend: str
    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_top_k: int
    tokenizer_hash: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    signals: tuple[Signal, ...]
    dtype: str
    max_request_tokens: int
    max_message_bytes: int
    eos_token_ids: tuple[int, ...]
    tokenizer_vocab_size: int

    @classmethod
    def from_proto(cls, msg: pb.TeacherInfo) -> TeacherInfo:
        values = {f.name: getattr(msg, f.name) for f in fields(cls)}
        values["signals"] = tuple(Signal(s) for s in msg.signals if s in Signal._value2member_map_)
        values["eos_token_ids"] = tuple(msg.eos_token_ids)
        return cls(**values)


@dataclass
class SequenceScores:
    """Teacher signal for one sequence, R rows (R = L-1-score_from); absent fields are None.

    ids (R, k) int64 (TOP_K; SAMPLED ids, -1 padded); logprobs (R, k) (TOP_K, AT_IDS); tail_logprob (R,);
    target_logprob (R,); full (R, V); hidden (R, H); counts (R, m) int32 (SAMPLED). Values in the request's
    value_dtype. ids arrive as int32 on the wire and are widened to int64, ready for torch.gather."""

    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    full: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return next((t.shape[0] for t in vars(self).values() if t is not None), 0)


TopKScores = SequenceScores
_SCORE_FIELDS = tuple(f.name for f in fields(SequenceScores))


@dataclass
class GeneratedSample:
    """One sampled continuation: token_ids (T,) int64, logprobs (T,) of those tokens at the request's
    temperature, top_ids (T, k) int64 / top_logprobs (T, k) when top_k_logprobs > 0, finish_reason."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    finish_reason: str = ""


# ---------------------------------------------------------------------------------- request building
def token_ids_list(seq: TokenIds, where: str = "sequence") -> list[int]:
    """A 1-D tensor / array / list of ints -> list[int] (no value checks: the server owns those)."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.is_floating_point():
            raise ValueError(f"{where}: expected a 1-D integer tensor, got {seq.dtype} {tuple(seq.shape)}")
        return seq.tolist()
    return [int(t) for t in seq]


def resolve_signal(signal: str | int | Signal) -> Signal:
    """A signal by name ("top_k", "TOP_K"), Signal or proto enum value -> Signal."""
    if isinstance(signal, str):
        try:
            return Signal[signal.strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in Signal)
            raise ValueError(f"signal: unknown name {signal!r}; one of {names}") from None
    return Signal(signal)


def value_dtype_code(dtype: torch.dtype | str) -> int:
    """torch.float32 / "bfloat16" -> the DType enum value for value_dtype (float32, float16, bfloat16)."""
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    code = DTYPE_OF_TORCH.get(dt)
    if code not in VALUE_DTYPES:
        raise ValueError(f"value_dtype: {dtype} is not one of float32, float16, bfloat16")
    return code


def _per_sequence(value, n: int, name: str) -> list:
    """None / a scalar -> one per sequence; a list -> checked to have one per sequence."""
    if value is None or isinstance(value, int):
        return [value or 0] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name}: {len(value)} values for {n} sequences")
    return value


@dataclass
class ScoreQuery:
    """One Score request: sequences + how to score them (`score()`'s arguments, for `score_stream`).

    score_from: None (0), one int for all, or one per sequence. signal: name or Signal. at_ids (AT_IDS): one
    (R, m) integer tensor per sequence. num_samples/seed: SAMPLED."""

    seqs: Sequence[TokenIds]
    score_from: int | Sequence[int] | None = None
    signal: str | Signal = "top_k"
    top_k: int = 64
    temperature: float = 1.0
    value_dtype: torch.dtype | str = torch.float32
    at_ids: Sequence[torch.Tensor] | None = None
    num_samples: int = 0
    seed: int = 0

    def to_proto(self, request_id: str = "") -> pb.ScoreRequest:
        signal = resolve_signal(self.signal)
        n = len(self.seqs)
        score_from = _per_sequence(self.score_from, n, "score_from")
        at_ids = _per_sequence(self.at_ids, n, "at_ids") if self.at_ids is not None else [None] * n
        sequences = []
        for i, (seq, sf, at) in enumerate(zip(self.seqs, score_from, at_ids, strict=True)):
            ts = pb.TokenSequence(token_ids=token_ids_list(seq, f"seqs[{i}]"), score_from=int(sf))
            if at is not None:
                ts.at_ids.CopyFrom(to_proto(torch.as_tensor(at).to(torch.int32)))
            sequences.append(ts)
        return pb.ScoreRequest(
            request_id=request_id,
            sequences=sequences,
            signal=int(signal),
            top_k=self.top_k if signal == Signal.TOP_K else 0,
            temperature=self.temperature,
            value_dtype=value_dtype_code(self.value_dtype),
            num_samples=self.num_samples,
            seed=self.seed,
        )


def expected_rows(req: pb.ScoreRequest) -> list[int]:
    """R = L-1-score_from for each sequence of a request."""
    return [len(s.token_ids) - 1 - s.score_from for s in req.sequences]


def build_generate_request(
    prompts: Sequence[TokenIds],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int | None = None,
    greedy: bool = False,
    top_k_logprobs: int = 0,
    stop_token_ids: Sequence[int] = (),
    value_dtype: torch.dtype | str = torch.float32,
    request_id: str = "",
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        request_id=request_id,
        prompts=[
            pb.TokenSequence(token_ids=token_ids_list(p, f"prompts[{i}]")) for i, p in enumerate(prompts)
        ],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        n=n,
        greedy=greedy,
        top_k_logprobs=top_k_logprobs,
        stop_token_ids=list(stop_token_ids),
        value_dtype=value_dtype_code(value_dtype),
    )
    if seed is not None:
        req.seed = seed
    return req


# -------------------------------------------------------------------------------- response decoding
def _piece_rows(piece: pb.SequenceScores) -> int:
    return next((getattr(piece, f).shape[0] for f in _SCORE_FIELDS if piece.HasField(f)), 0)


def decode_pieces(pieces: Sequence[pb.SequenceScores]) -> SequenceScores:
    """Reassemble one sequence from its pieces (any order; split by first_row on ScoreStream)."""
    pieces = sorted(pieces, key=lambda p: p.first_row)
    row = 0
    for p in pieces:
        if p.first_row != row:
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"sequence {p.sequence_index}: rows from {row} missing"
            )
        row += _piece_rows(p)
    out = {}
    for name in _SCORE_FIELDS:
        parts = [from_proto(getattr(p, name), name) for p in pieces if p.HasField(name)]
        if parts:
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if "ids" in out:
        out["ids"] = out["ids"].long()
    return SequenceScores(**out)


def decode_score_response(resp: pb.ScoreResponse) -> list[SequenceScores]:
    """A unary ScoreResponse: one whole SequenceScores per sequence, in order."""
    return [decode_pieces([r]) for r in resp.results]


class ScoreAssembly:
    """Collects one request's ScoreStream responses until every sequence has its R rows (or `last`)."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.reset()

    def reset(self) -> None:
        self.pieces: list[list[pb.SequenceScores]] = [[] for _ in self.rows]
        self.got = [0] * len(self.rows)
        self.last = False

    def add(self, resp: pb.ScoreResponse) -> None:
        for r in resp.results:
            if not 0 <= r.sequence_index < len(self.rows):
                raise TeacherError(
                    grpc.StatusCode.DATA_LOSS, f"sequence_index {r.sequence_index} out of range"
                )
            self.pieces[r.sequence_index].append(r)
            self.got[r.sequence_index] += _piece_rows(r)
        self.last = self.last or resp.last

    @property
    def complete(self) -> bool:
        return self.last or all(g >= want for g, want in zip(self.got, self.rows, strict=True))

    def results(self) -> list[SequenceScores]:
        return [decode_pieces(p) for p in self.pieces]


def decode_generate_chunk(msg: pb.GenerateResponse) -> GenerateChunk:
    """One GenerateResponse -> GenerateChunk (top_ids widened to int64)."""
    has = msg.HasField
    return GenerateChunk(
        prompt_index=msg.prompt_index,
        sample_index=msg.sample_index,
        token_ids=list(msg.token_ids),
        logprobs=from_proto(msg.logprobs, "logprobs") if has("logprobs") else torch.empty(0),
        top_ids=from_proto(msg.top_ids, "top_ids").long() if has("top_ids") else None,
        top_logprobs=from_proto(msg.top_logprobs, "top_logprobs") if has("top_logprobs") else None,
        finished=msg.finished,
        finish_reason=msg.finish_reason,
    )


def collect_samples(chunks: Iterable[GenerateChunk], num_prompts: int, n: int) -> list[list[GeneratedSample]]:
    """Concatenate streamed chunks into one GeneratedSample per (prompt, sample): result[prompt][sample]."""
    parts: dict[tuple[int, int], list[GenerateChunk]] = {}
    for c in chunks:
        parts.setdefault((c.prompt_index, c.sample_index), []).append(c)

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        ts = [t for t in ts if t is not None]
        return torch.cat(ts) if ts else None

    out = []
    for p in range(num_prompts):
        row = []
        for s in range(n):
            cs = parts.get((p, s), [])
            ids = torch.tensor([t for c in cs for t in c.token_ids], dtype=torch.int64)
            lps = cat([c.logprobs for c in cs])
            row.append(
                GeneratedSample(
                    token_ids=ids,
                    logprobs=lps if lps is not None else torch.empty(0),
                    top_ids=cat([c.top_ids for c in cs]),
                    top_logprobs=cat([c.top_logprobs for c in cs]),
                    finish_reason=next((c.finish_reason for c in reversed(cs) if c.finish_reason), ""),
                )
            )
        out.append(row)
    return out
