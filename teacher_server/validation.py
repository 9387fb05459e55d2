"""Request validation: proto requests -> engine types, or a RequestError naming the offending field.

Every check of the teacher-service contract lives here, so backends may trust their inputs (see
backends/base.py). Token ids are checked with vectorized numpy ops: a request may carry 64k tokens.

    limits = Limits.from_info(backend.info, cfg)
    items, params = parse_score_request(request, limits)      # raises RequestError
    transport = parse_transport(request, limits)              # id encoding, data-plane session
    prompts, gparams = parse_generate_request(request, limits, codec)   # codec: text prompts (text.py)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from asymkd.contract import NO_RETRY_METADATA, IdEncoding, Signal, TeacherInfo
from asymkd.packing import id_bits
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import TORCH_OF_DTYPE, VALUE_DTYPES, WireError, tensor_from_proto
from teacher_server.backends.base import GenerateParams, ScoreItem, ScoreParams
from teacher_server.text import TextCodec

# Below this, logits / T can overflow float32 and log-softmax turns to NaN; greedy decoding is the limit.
MIN_TEMPERATURE = 1e-6
# Per-message overhead on top of the tensor bytes (tags, lengths, shapes, request_id), generous on purpose.
_OVERHEAD_PER_SEQUENCE = 256
SPLIT_ADVICE = "send fewer/shorter sequences or split them over several requests on ScoreStream"


class RequestError(Exception):
    """A caller's mistake (or a refusal the caller can act on), mapped by the servicer to `code`.

    `retryable=False` marks a refusal that would recur on any replica: the status then carries gRPC's server
    pushback `grpc-retry-pushback-ms: -1` (no retry; asymkd.contract). None (the default) sends nothing."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str, *, retryable: bool | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.code = code
        self.field = field
        self.message = message
        self.retryable = retryable

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return NO_RETRY_METADATA if self.retryable is False else ()


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, field, message)


@dataclass(frozen=True)
class Limits:
    """What a request may ask of this server: the backend's model facts and the serve config's caps."""

    vocab_size: int
    hidden_size: int
    max_seq_len: int
    max_top_k: int
    max_request_tokens: int
    signals: frozenset[Signal]
    hint: str = ""  # the backend's note on what it serves (TeacherInfo.note), for refusals

    @classmethod
    def from_info(cls, info: TeacherInfo, max_request_tokens: int) -> Limits:
        return cls(
            vocab_size=info.vocab_size,
            hidden_size=info.hidden_size,
            max_seq_len=info.max_seq_len,
            max_top_k=min(info.max_top_k, info.vocab_size),
            max_request_tokens=max_request_tokens,
            signals=frozenset(Signal(s) for s in info.signals),
            hint=info.note,
        )


def _enum_name(enum_type, value: int) -> str | None:
    try:
        return enum_type.Name(value)
    except ValueError:
        return None


def parse_signal(value: int, limits: Limits) -> Signal:
    if value == pb.SIGNAL_UNSPECIFIED:
        value = pb.TOP_K
    if _enum_name(pb.Signal, value) is None:
        raise invalid("signal", f"unknown value {value}")
    signal = Signal(value)
    if signal not in limits.signals:
        have = ", ".join(s.name for s in sorted(limits.signals))
        hint = f"; {limits.hint}" if limits.hint else ""
        raise RequestError(
            grpc.StatusCode.UNIMPLEMENTED,
            "signal",
            f"{signal.name} is not implemented by this teacher ({have}){hint}",
        )
    return signal


def parse_value_dtype(value: int, field: str = "value_dtype") -> torch.dtype:
    if value == pb.DTYPE_UNSPECIFIED:
        return torch.float32
    name = _enum_name(pb.DType, value)
    if name is None:
        raise invalid(field, f"unknown value {value}")
    if value not in VALUE_DTYPES:
        raise invalid(field, f"{name} is not a value dtype (use FLOAT32, FLOAT16 or BFLOAT16)")
    return TORCH_OF_DTYPE[value]


def parse_temperature(value: float, field: str = "temperature") -> float:
    if not math.isfinite(value):
        raise invalid(field, f"{value} is not finite")
    if value < 0:
        raise invalid(field, f"{value:g} is negative")
    if value == 0:
        return 1.0
    if value < MIN_TEMPERATURE:
        raise invalid(field, f"{value:g} is below the minimum {MIN_TEMPERATURE:g}")
    return float(value)


def check_range(field: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise invalid(field, f"{value} not in [{lo}, {hi}]")
    return value


def check_token_ids(field: str, ids: np.ndarray, vocab_size: int) -> None:
    """Vectorized: name the first id outside [0, vocab_size)."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        j = int(bad[0])
        v = int(ids.flat[j])
        reason = f"id {v} < 0" if v < 0 else f"id {v} >= vocab_size {vocab_size}"
        raise invalid(f"{field}[{j}]", reason)


def _check_budget(total_tokens: int, limits: Limits, what: str) -> None:
    if total_tokens > limits.max_request_tokens:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "sequences" if what == "score" else "prompts",
            f"{total_tokens} tokens exceed --max-request-tokens {limits.max_request_tokens}; {SPLIT_ADVICE}",
            retryable=False,
        )


def _score_params(req: pb.ScoreRequest, limits: Limits) -> ScoreParams:
    signal = parse_signal(req.signal, limits)
    value_dtype = parse_value_dtype(req.value_dtype)
    temperature = parse_temperature(req.temperature)
    top_k = num_samples = seed = 0
    if signal == Signal.TOP_K:
        top_k = check_range("top_k", req.top_k, 1, limits.max_top_k)
    elif signal == Signal.SAMPLED:
        num_samples = check_range("num_samples", req.num_samples, 1, limits.max_top_k)
        seed = req.seed
    return ScoreParams(
        signal=signal,
        top_k=top_k,
        temperature=temperature,
        value_dtype=value_dtype,
        num_samples=num_samples,
        seed=seed,
    )


def _at_ids(seq: pb.TokenSequence, field: str, rows: int, limits: Limits) -> torch.Tensor:
    if not seq.HasField("at_ids"):
        raise invalid(field, "required for signal AT_IDS (INT32 [R, m])")
    try:
        at = tensor_from_proto(seq.at_ids, field)
    except WireError as e:
        raise invalid(e.field, str(e).split(": ", 1)[1]) from None
    if at.dtype not in (torch.int32, torch.int64):  # PACKED_UINT decodes to int64
        raise invalid(f"{field}.dtype", f"{at.dtype} is not an integer dtype (use INT32 or PACKED_UINT)")
    if at.dim() != 2 or at.shape[0] != rows or not 1 <= at.shape[1] <= limits.max_top_k:
        raise invalid(
            f"{field}.shape",
            f"{list(at.shape)} is not [R={rows}, m] with 1 <= m <= max_top_k {limits.max_top_k}",
        )
    check_token_ids(field, at.numpy().reshape(-1), limits.vocab_size)
    return at.long()


def _score_item(seq: pb.TokenSequence, i: int, params: ScoreParams, limits: Limits) -> ScoreItem:
    field = f"sequences[{i}]"
    if seq.text:  # scores are per token: the caller tokenizes (the student's and teacher's tokenizer agree)
        raise invalid(f"{field}.text", "Score takes token_ids only (text prompts are for Generate)")
    n = len(seq.token_ids)
    if n < 2:
        raise invalid(
            f"{field}.token_ids", f"{n} tokens; a sequence needs at least 2 (L tokens give L-1 rows)"
        )
    if n > limits.max_seq_len:
        raise invalid(f"{field}.token_ids", f"length {n} > max_seq_len {limits.max_seq_len}")
    check_range(f"{field}.score_from", seq.score_from, 0, n - 2)
    ids = np.asarray(seq.token_ids, dtype=np.int64)
    check_token_ids(f"{field}.token_ids", ids, limits.vocab_size)
    at_ids = None
    if params.signal == Signal.AT_IDS:
        at_ids = _at_ids(seq, f"{field}.at_ids", n - 1 - seq.score_from, limits)
    return ScoreItem(token_ids=torch.from_numpy(ids), score_from=seq.score_from, at_ids=at_ids)


@dataclass(frozen=True)
class Transport:
    """How a Score answer travels: `id_bits` > 0 packs ids and counts to that many bits per id (PACKED_IDS);
    `session` names the data-plane session that FULL / HIDDEN rows go over ("" = in the messages)."""

    id_bits: int = 0
    session: str = ""

    @property
    def remote(self) -> bool:
        return bool(self.session)


def parse_transport(req: pb.ScoreRequest, limits: Limits) -> Transport:
    encoding = req.id_encoding or pb.INT32_IDS
    if _enum_name(pb.IdEncoding, encoding) is None:
        raise invalid("id_encoding", f"unknown value {encoding}")
    session = req.data_plane_session
    if len(session) > 128 or not session.isascii():
        raise invalid("data_plane_session", "not a session name from OpenDataPlane")
    bits = id_bits(limits.vocab_size) if encoding == IdEncoding.PACKED_IDS else 0
    return Transport(id_bits=bits, session=session)


def parse_score_request(req: pb.ScoreRequest, limits: Limits) -> tuple[list[ScoreItem], ScoreParams]:
    """Validate a ScoreRequest; returns the engine items (in order) and their shared params."""
    if not req.sequences:
        raise invalid("sequences", "empty request (no sequences)")
    params = _score_params(req, limits)
    _check_budget(sum(len(s.token_ids) for s in req.sequences), limits, "score")
    items = [_score_item(seq, i, params, limits) for i, seq in enumerate(req.sequences)]
    return items, params


def response_bytes_per_row(params: ScoreParams, limits: Limits) -> int:
    """Bytes one result row takes on the wire (tensor data only)."""
    v = torch.empty((), dtype=params.value_dtype).element_size()
    if params.signal == Signal.TOP_K:
        return params.top_k * (4 + v) + 2 * v
    if params.signal == Signal.FULL:
        return limits.vocab_size * v + v
    if params.signal == Signal.HIDDEN:
        return limits.hidden_size * v
    if params.signal == Signal.SAMPLED:
        return params.num_samples * (8 + v) + v
    if params.signal == Signal.AT_IDS:
        return 2 * v  # + m values per row (estimate_response_bytes)
    return v  # TARGET_ONLY


def estimate_response_bytes(
    items: list[ScoreItem], params: ScoreParams, limits: Limits, remote: bool = False
) -> int:
    """The encoded size of a unary ScoreResponse for these items, slightly over-estimated; `remote`: FULL /
    HIDDEN rows travel over the data plane, not in the message."""
    per_row = response_bytes_per_row(params, limits)
    if remote and params.signal in (Signal.FULL, Signal.HIDDEN):
        per_row = torch.empty((), dtype=params.value_dtype).element_size()
    v = torch.empty((), dtype=params.value_dtype).element_size()
    total = 0
    for item in items:
        extra = item.at_ids.shape[1] * v if item.at_ids is not None else 0
        total += item.num_rows * (per_row + extra) + _OVERHEAD_PER_SEQUENCE
    return total


def check_response_size(nbytes: int, max_message_bytes: int, params: ScoreParams) -> None:
    if nbytes <= max_message_bytes:
        return
    hint = "use TOP_K instead of FULL, " if params.signal == Signal.FULL else ""
    raise RequestError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
        f"the response would be {nbytes} bytes, over the message limit of {max_message_bytes} bytes; "
        f"{hint}send fewer rows (shorter sequences, a later score_from) or use ScoreStream, which splits "
        "large results over several messages",
        retryable=False,
    )


def _generate_prompt(
    seq: pb.TokenSequence, i: int, max_new: int, limits: Limits, codec: TextCodec | None
) -> np.ndarray:
    """One prompt's ids: its token_ids, or its text tokenized by `codec` (the server's tokenizer)."""
    field = f"prompts[{i}].token_ids"
    if seq.text:
        if seq.token_ids:
            raise invalid(f"prompts[{i}]", "set token_ids or text, not both")
        field = f"prompts[{i}].text"
        if codec is None:
            raise invalid(
                field,
                "this teacher has no tokenizer (its model folder has no tokenizer files); send token_ids",
            )
        ids = np.asarray(codec.encode(seq.text), dtype=np.int64)
        if ids.size < 1:
            raise invalid(field, f"{seq.text!r} tokenizes to no tokens")
    else:
        ids = np.asarray(seq.token_ids, dtype=np.int64)
        if ids.size < 1:
            raise invalid(field, "empty prompt (set token_ids or text)")
    n = int(ids.size)
    if n + max_new > limits.max_seq_len:
        raise invalid(field, f"length {n} + max_new_tokens {max_new} > max_seq_len {limits.max_seq_len}")
    check_token_ids(field, ids, limits.vocab_size)
    return ids


def parse_generate_request(
    req: pb.GenerateRequest, limits: Limits, codec: TextCodec | None = None
) -> tuple[list[torch.Tensor], GenerateParams]:
    """Validate a GenerateRequest; returns the prompts as (L,) int64 tensors and the sampling params. Text
    prompts and return_text need `codec` (the server's tokenizer)."""
    if not req.prompts:
        raise invalid("prompts", "empty request (no prompts)")
    max_new = check_range("max_new_tokens", req.max_new_tokens, 1, limits.max_seq_len - 1)
    if req.n < 0:
        raise invalid("n", f"{req.n} is negative (0 means 1)")
    n = req.n or 1
    top_p = req.top_p
    if not math.isfinite(top_p) or not 0 <= top_p <= 1:
        raise invalid("top_p", f"{top_p:g} not in (0, 1] (0 means 1.0)")
    top_k = check_range("top_k", req.top_k, 0, limits.vocab_size)
    temperature = parse_temperature(req.temperature)
    top_k_logprobs = check_range("top_k_logprobs", req.top_k_logprobs, 0, limits.max_top_k)
    value_dtype = parse_value_dtype(req.value_dtype)
    stops = np.asarray(req.stop_token_ids, dtype=np.int64)
    check_token_ids("stop_token_ids", stops, limits.vocab_size)
    if req.return_text and codec is None:
        raise invalid("return_text", "this teacher has no tokenizer to decode text with")
    # Token budget first on what the request itself says (text prompts count at least one token each).
    lengths = [len(p.token_ids) or 1 for p in req.prompts]
    _check_generate_budget(lengths, max_new, n, limits)
    prompts = [_generate_prompt(p, i, max_new, limits, codec) for i, p in enumerate(req.prompts)]
    _check_generate_budget([p.size for p in prompts], max_new, n, limits)
    params = GenerateParams(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=float(top_p) or 1.0,
        top_k=top_k,
        n=n,
        seed=req.seed if req.HasField("seed") else None,
        greedy=req.greedy,
        top_k_logprobs=top_k_logprobs,
        stop_token_ids=tuple(int(t) for t in stops),
        value_dtype=value_dtype,
    )
    return [torch.from_numpy(p) for p in prompts], params


def _too_many(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, field, message, retryable=False)


def _check_generate_budget(lengths: list[int], max_new: int, n: int, limits: Limits) -> None:
    """(prompt tokens + max_new_tokens) × n, summed over the prompts, within --max-request-tokens."""
    total = sum((length + max_new) * n for length in lengths)
    if total > limits.max_request_tokens:
        raise _too_many(
            "n" if n > 1 else "max_new_tokens",
            f"(prompt tokens + max_new_tokens {max_new}) × n {n} over {len(lengths)} prompt(s) = {total} "
            f"tokens exceed --max-request-tokens {limits.max_request_tokens}; ask for fewer samples or "
            "tokens, or split the prompts over several requests",
        )
