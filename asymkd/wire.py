"""The wire codec, both directions, in one place: torch tensors and the contract types <-> `asymkd.v1` protos.

    t = tensor_to_proto(torch.randn(3, 4)); x = tensor_from_proto(t)     # little-endian, C order, no pickle
    msg = info_to_proto(info); info = info_from_proto(msg)               # TeacherInfo
    for group in split_results(scores, chunk_bytes): ...                 # server: results -> SequenceScores pieces
    req = ScoreQuery(seqs, score_from=1, top_k=64).to_proto("req-0")    # client: arguments -> request
    asm = ScoreAssembly(expected_rows(req)); asm.add(resp) ...; asm.results()   # client: pieces -> results
    chunk_to_proto(request_id, chunk) / decode_generate_chunk(msg)       # Generate
    pack_tensor(ids, bits) -> PACKED_UINT Tensor; tensor_from_proto unpacks it to int64

Pure functions of protos and tensors, no I/O (the server parses requests itself, with a precise status per
field: teacher_server/validation.py). Local argument mistakes (an unknown signal name, a score_from list of
the wrong length) raise ValueError. A Tensor message that cannot be decoded raises WireError naming
the field; an inconsistent response (missing rows, a bad sequence_index) raises DataLossError.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from asymkd.contract import (
    SCORE_FIELDS,
    DataPlane,
    GenerateChunk,
    GeneratedSample,
    IdEncoding,
    OutputLayerInfo,
    SequenceScores,
    Signal,
    TeacherInfo,
)
from asymkd.packing import pack_tensor, unpack_tensor
from asymkd.v1 import teacher_pb2 as pb

TORCH_OF_DTYPE: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT32: torch.int32,
    pb.INT64: torch.int64,
    pb.UINT8: torch.uint8,
}
DTYPE_OF_TORCH: dict[torch.dtype, int] = {v: k for k, v in TORCH_OF_DTYPE.items()}
# Value dtypes a caller may ask for in ScoreRequest.value_dtype / GenerateRequest.value_dtype.
VALUE_DTYPES = (pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16)
# Integer result fields travel as int32 (ids < 2^31); the decoder widens ids to int64.
_INT32_FIELDS = ("ids", "counts", "top_ids")
_LITTLE = sys.byteorder == "little"
# ScoreStream: the initial metadata a server sends once it has accepted the call. A client writes requests only
# after it: a write racing a refusal makes grpc.aio report INTERNAL instead of the refusal's status
# (https://github.com/grpc/grpc/issues/36066).
STREAM_OPEN = ("asymkd-stream", "open")


class WireError(ValueError):
    """A Tensor message that cannot be decoded; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class DataLossError(ValueError):
    """A response whose pieces do not add up (rows missing, a sequence_index out of range)."""


# ------------------------------------------------------------------------------------------------ tensors
def tensor_to_proto(x: torch.Tensor) -> pb.Tensor:
    """Encode a CPU/GPU tensor as a Tensor message (copies to host memory, C order)."""
    if x.dtype not in DTYPE_OF_TORCH:
        raise TypeError(f"dtype {x.dtype} has no wire encoding; use one of {list(DTYPE_OF_TORCH)}")
    x = x.detach().to("cpu").contiguous()
    # numpy has no bfloat16: ship its raw 16-bit pattern.
    raw = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    arr = raw.numpy()
    if not _LITTLE:
        arr = arr.byteswap()
    return pb.Tensor(dtype=DTYPE_OF_TORCH[x.dtype], shape=list(x.shape), data=arr.tobytes())


def tensor_from_proto(t: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message (PACKED_UINT -> int64); raises WireError (naming `field`) on unknown dtype or
    size mismatch."""
    if t.dtype == pb.PACKED_UINT and all(d >= 0 for d in t.shape):
        try:
            return unpack_tensor(t)
        except ValueError as e:
            raise WireError(f"{field}.{'data' if 1 <= t.bits <= 63 else 'bits'}", str(e)) from None
    if t.dtype not in TORCH_OF_DTYPE:
        raise WireError(f"{field}.dtype", f"unknown or unspecified dtype {t.dtype}")
    if any(d < 0 for d in t.shape):
        raise WireError(f"{field}.shape", f"negative dimension in {list(t.shape)}")
    dtype = TORCH_OF_DTYPE[t.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(t.shape)
    if len(t.data) != numel * itemsize:
        raise WireError(
            f"{field}.data",
            f"{len(t.data)} bytes for shape {list(t.shape)} of {dtype} (expected {numel * itemsize})",
        )
    if numel == 0:
        return torch.empty(tuple(t.shape), dtype=dtype)
    np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype
    arr = np.frombuffer(t.data, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(tuple(t.shape))
    out = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def _encode(name: str, x: torch.Tensor, bits: int = 0) -> pb.Tensor:
    """A result field as a Tensor; `bits` > 0 packs integer fields (ids at least that many bits per id)."""
    if name in _INT32_FIELDS:
        return pack_tensor(x, bits if name != "counts" else 0) if bits else tensor_to_proto(x.to(torch.int32))
    return tensor_to_proto(x)


# ------------------------------------------------------------------------------------------------- GetInfo
_INFO_WIRE_FIELDS = tuple(f.name for f in fields(TeacherInfo) if f.name not in ("note", "output_layer"))
_ENUM_LISTS = {"signals": Signal, "id_encodings": IdEncoding, "data_planes": DataPlane}


def info_to_proto(info: TeacherInfo) -> pb.TeacherInfo:
    values = {n: getattr(info, n) for n in _INFO_WIRE_FIELDS}
    for name in (*_ENUM_LISTS, "value_dtypes", "eos_token_ids"):
        values[name] = [int(s) for s in values[name]]
    if info.output_layer is not None:
        values["output_layer"] = pb.OutputLayerInfo(**vars(info.output_layer))
    return pb.TeacherInfo(**values)


def info_from_proto(msg: pb.TeacherInfo) -> TeacherInfo:
    """Enum values this side does not know (a newer server) are left out."""
    values = {n: getattr(msg, n) for n in _INFO_WIRE_FIELDS}
    for name, enum_type in _ENUM_LISTS.items():
        values[name] = tuple(enum_type(s) for s in getattr(msg, name) if s in enum_type._value2member_map_)
    values["value_dtypes"] = tuple(msg.value_dtypes)
    values["eos_token_ids"] = tuple(msg.eos_token_ids)
    if msg.HasField("output_layer"):
        o = msg.output_layer
        values["output_layer"] = OutputLayerInfo(
            o.fingerprint, o.dtype, o.logit_scale, o.logit_softcap, o.has_bias
        )
    return TeacherInfo(**values)


# ---------------------------------------------------------------------------------------------- requests
TokenIds = Sequence[int] | torch.Tensor


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
    """One Score request: sequences (each L >= 2 token ids) + how to score them.

    score_from: None (0), one int for all, or one per sequence. signal: name or Signal. top_k: TOP_K only.
    at_ids (AT_IDS): one (R, m) integer tensor per sequence. num_samples/seed: SAMPLED. id_encoding: how ids
    travel both ways (PACKED_IDS also packs at_ids). data_plane_session: an open data-plane session (its
    FULL / HIDDEN rows then come back as ScoreResponse.remote)."""

    seqs: Sequence[TokenIds]
    score_from: int | Sequence[int] | None = None
    signal: str | Signal = "top_k"
    top_k: int = 64
    temperature: float = 1.0
    value_dtype: torch.dtype | str = torch.float32
    at_ids: Sequence[torch.Tensor] | None = None
    num_samples: int = 0
    seed: int = 0
    id_encoding: IdEncoding = IdEncoding.INT32_IDS
    data_plane_session: str = ""

    def to_proto(self, request_id: str = "") -> pb.ScoreRequest:
        signal = resolve_signal(self.signal)
        n = len(self.seqs)
        score_from = _per_sequence(self.score_from, n, "score_from")
        at_ids = _per_sequence(self.at_ids, n, "at_ids") if self.at_ids is not None else [None] * n
        sequences = []
        for i, (seq, sf, at) in enumerate(zip(self.seqs, score_from, at_ids, strict=True)):
            ts = pb.TokenSequence(token_ids=token_ids_list(seq, f"seqs[{i}]"), score_from=int(sf))
            if at is not None:
                at = torch.as_tensor(at)
                packed = self.id_encoding == IdEncoding.PACKED_IDS
                ts.at_ids.CopyFrom(pack_tensor(at) if packed else tensor_to_proto(at.to(torch.int32)))
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
            id_encoding=int(self.id_encoding),
            data_plane_session=self.data_plane_session,
        )


def generate_prompt(prompt: TokenIds | str, where: str) -> pb.TokenSequence:
    """A Generate prompt: token ids, or text (a str) the server tokenizes."""
    if isinstance(prompt, str):
        return pb.TokenSequence(text=prompt)
    return pb.TokenSequence(token_ids=token_ids_list(prompt, where))


def generate_request(
    prompts: Sequence[TokenIds | str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    seed: int | None = None,
    greedy: bool = False,
    top_k_logprobs: int = 0,
    stop_token_ids: Sequence[int] = (),
    value_dtype: torch.dtype | str = torch.float32,
    return_text: bool = False,
    request_id: str = "",
) -> pb.GenerateRequest:
    """Generate's arguments -> a GenerateRequest; each prompt is token ids or a str (server-tokenized)."""
    if isinstance(prompts, str | bytes):
        raise ValueError("prompts: a list of prompts (token-id lists or strings), not one string")
    req = pb.GenerateRequest(
        request_id=request_id,
        prompts=[generate_prompt(p, f"prompts[{i}]") for i, p in enumerate(prompts)],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        n=n,
        greedy=greedy,
        top_k_logprobs=top_k_logprobs,
        stop_token_ids=list(stop_token_ids),
        value_dtype=value_dtype_code(value_dtype),
        return_text=return_text,
    )
    if seed is not None:
        req.seed = seed
    return req


# ------------------------------------------------------------------------------------------ Score: encode
def scores_to_proto(
    s: SequenceScores, sequence_index: int, rows: slice | None = None, id_bits: int = 0
) -> pb.SequenceScores:
    """One sequence's result (or the `rows` slice of it) as a SequenceScores message; `id_bits` > 0 packs
    ids (and counts) as PACKED_UINT."""
    tensors = {n: _encode(n, t if rows is None else t[rows], id_bits) for n, t in s.tensors().items()}
    first_row = 0 if rows is None else rows.start
    return pb.SequenceScores(sequence_index=sequence_index, first_row=first_row, **tensors)


def split_results(
    scores: list[SequenceScores], chunk_bytes: int, id_bits: int = 0
) -> Iterator[list[pb.SequenceScores]]:
    """Pack results into groups of about `chunk_bytes` each; a large result is cut by rows (>= 1 row)."""
    group: list[pb.SequenceScores] = []
    group_bytes = 0
    for i, s in enumerate(scores):
        rows = s.num_rows
        per_row = max(1, s.nbytes() // max(rows, 1))
        step = max(1, chunk_bytes // per_row)
        for start in range(0, max(rows, 1), step):
            stop = min(start + step, rows)
            piece_bytes = (stop - start) * per_row
            if group and group_bytes + piece_bytes > chunk_bytes:
                yield group
                group, group_bytes = [], 0
            group.append(scores_to_proto(s, i, slice(start, stop), id_bits))
            group_bytes += piece_bytes
    if group:
        yield group


# ------------------------------------------------------------------------------------------ Score: decode
def expected_rows(req: pb.ScoreRequest) -> list[int]:
    """R = L-1-score_from for each sequence of a request."""
    return [len(s.token_ids) - 1 - s.score_from for s in req.sequences]


def _piece_rows(piece: pb.SequenceScores) -> int:
    return next((getattr(piece, f).shape[0] for f in SCORE_FIELDS if piece.HasField(f)), 0)


def decode_pieces(pieces: Sequence[pb.SequenceScores]) -> SequenceScores:
    """Reassemble one sequence from its pieces (any order; split by first_row on ScoreStream)."""
    pieces = sorted(pieces, key=lambda p: p.first_row)
    row = 0
    for p in pieces:
        if p.first_row != row:
            raise DataLossError(f"sequence {p.sequence_index}: rows from {row} missing")
        row += _piece_rows(p)
    out = {}
    for name in SCORE_FIELDS:
        parts = [tensor_from_proto(getattr(p, name), name) for p in pieces if p.HasField(name)]
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
        self.pieces: list[list[pb.SequenceScores]] = [[] for _ in rows]
        self.got = [0] * len(rows)
        self.last = False
        self.remote: list = []  # asymkd.remote.RemoteRef: data-plane tensors of the request

    def add(self, resp: pb.ScoreResponse) -> None:
        for r in resp.results:
            if not 0 <= r.sequence_index < len(self.rows):
                raise DataLossError(f"sequence_index {r.sequence_index} out of range")
            self.pieces[r.sequence_index].append(r)
            self.got[r.sequence_index] += _piece_rows(r)
        if resp.remote:
            from asymkd.remote import RemoteRef  # remote.py builds on this module

            self.remote += [RemoteRef.from_proto(m) for m in resp.remote]
        self.last = self.last or resp.last

    @property
    def complete(self) -> bool:
        # remote tensors come on the final response, which also completes the rows sent in messages
        return self.last or all(g >= want for g, want in zip(self.got, self.rows, strict=True))

    def results(self) -> list[SequenceScores]:
        return [decode_pieces(p) for p in self.pieces]


# ------------------------------------------------------------------------------------------------ Generate
def chunk_to_proto(request_id: str, c: GenerateChunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id=request_id,
        prompt_index=c.prompt_index,
        sample_index=c.sample_index,
        token_ids=c.token_ids,
        logprobs=tensor_to_proto(c.logprobs),
        finished=c.finished,
        finish_reason=c.finish_reason,
        text=c.text,
    )
    if c.top_ids is not None:
        msg.top_ids.CopyFrom(_encode("top_ids", c.top_ids))
        msg.top_logprobs.CopyFrom(tensor_to_proto(c.top_logprobs))
    return msg


def decode_generate_chunk(msg: pb.GenerateResponse) -> GenerateChunk:
    """One GenerateResponse -> GenerateChunk (top_ids widened to int64)."""
    has = msg.HasField
    return GenerateChunk(
        prompt_index=msg.prompt_index,
        sample_index=msg.sample_index,
        token_ids=list(msg.token_ids),
        logprobs=tensor_from_proto(msg.logprobs, "logprobs") if has("logprobs") else torch.empty(0),
        top_ids=tensor_from_proto(msg.top_ids, "top_ids").long() if has("top_ids") else None,
        top_logprobs=tensor_from_proto(msg.top_logprobs, "top_logprobs") if has("top_logprobs") else None,
        finished=msg.finished,
        finish_reason=msg.finish_reason,
        text=msg.text,
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
            lps = cat([c.logprobs for c in cs])
            row.append(
                GeneratedSample(
                    token_ids=torch.tensor([t for c in cs for t in c.token_ids], dtype=torch.int64),
                    logprobs=lps if lps is not None else torch.empty(0),
                    top_ids=cat([c.top_ids for c in cs]),
                    top_logprobs=cat([c.top_logprobs for c in cs]),
                    finish_reason=next((c.finish_reason for c in reversed(cs) if c.finish_reason), ""),
                    text="".join(c.text for c in cs),
                )
            )
        out.append(row)
    return out
