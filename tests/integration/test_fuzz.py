"""Fuzzing one real teacher server (tiny Llama, hf backend) with random and malformed requests.

Hypothesis draws ScoreRequest / GenerateRequest field values (lengths, ids out of range, negative values, huge
top_k, NaN/inf temperatures, bad at_ids tensors, empty and duplicate request ids on a stream) and raw bytes
sent to every method through a generic channel method (no serializer). Every answer must be OK or a status
that names the caller's mistake, never UNKNOWN/INTERNAL; the server must not crash, and afterwards a good
request is answered as it was before the fuzzing. Bounded and reproducible: a fixed number of examples,
`derandomize=True`, no example database.
"""

from __future__ import annotations

import functools
import math

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import tensor_from_proto, tensor_to_proto

VOCAB, MAX_LEN = 512, 512
TIMEOUT_S = 60
CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,  # a known signal this backend lacks
}
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OPTIONS = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 256 << 20)]

# ---- strategies over the proto fields --------------------------------------------------------------------
# A request is drawn valid, then up to two of its fields are broken: so every check is reached, deep in the
# request too (a request broken everywhere only ever meets the first check).
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)
valid_id = st.integers(0, VOCAB - 1)
bad_id = st.one_of(
    st.integers(-3, -1), st.integers(VOCAB, VOCAB + 3), INT32.filter(lambda i: not 0 <= i < VOCAB)
)
bad_float = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e-30]), st.floats(width=32))
bad_enum = st.sampled_from([-2, -1, 7, 8, 9, 1000])
SIGNALS = [pb.SIGNAL_UNSPECIFIED, pb.TOP_K, pb.TARGET_ONLY, pb.AT_IDS, pb.SAMPLED, pb.FULL, pb.HIDDEN]
VALUE_DTYPES = [pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16]
INT_DTYPES = [pb.INT32, pb.INT64, pb.UINT8]


def ids_tensor(ids: list[int], rows: int, m: int) -> pb.Tensor:
    return tensor_to_proto(torch.tensor(ids, dtype=torch.int32).reshape(rows, m))


@st.composite
def bad_tensor(draw, rows: int) -> pb.Tensor:
    """at_ids that cannot be right: the wrong row count, ids out of range, or not an INT32 [R, m] at all."""
    kind = draw(st.sampled_from(["rows", "ids", "width", "garbage"]))
    if kind in ("rows", "ids", "width"):
        r = draw(st.integers(0, 6).filter(lambda n: n != rows)) if kind == "rows" else rows
        m = draw(st.sampled_from([0, 600])) if kind == "width" else draw(st.integers(1, 4))
        ids = draw(st.lists(bad_id if kind == "ids" else valid_id, min_size=r * m, max_size=r * m))
        return ids_tensor(ids, r, m)
    shape = draw(st.lists(st.one_of(st.integers(-2, 8), st.just(2**62)), max_size=3))
    dtype = draw(st.one_of(bad_enum, st.sampled_from([pb.FLOAT32, pb.INT64, pb.UINT8, pb.INT32])))
    return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))


@st.composite
def token_sequence(draw, signal: int, broken: bool) -> pb.TokenSequence:
    n = draw(st.integers(2, 40))
    seq = pb.TokenSequence(token_ids=draw(st.lists(valid_id, min_size=n, max_size=n)))
    seq.score_from = draw(st.integers(0, n - 2))
    rows = n - 1 - seq.score_from
    if signal == pb.AT_IDS:
        m = draw(st.integers(1, 8))
        seq.at_ids.CopyFrom(
            ids_tensor(draw(st.lists(valid_id, min_size=rows * m, max_size=rows * m)), rows, m)
        )
    if not broken:
        return seq
    what = draw(st.sampled_from(["length", "id", "score_from", "at_ids"]))
    if what == "length":
        seq.token_ids[:] = [5] * draw(st.sampled_from([0, 1, MAX_LEN + 1, MAX_LEN + 2]))
    elif what == "id":
        seq.token_ids[draw(st.integers(0, n - 1))] = draw(bad_id)
    elif what == "score_from":
        seq.score_from = draw(st.one_of(st.integers(-3, -1), st.integers(n - 1, n + 3), INT32))
    else:
        seq.at_ids.CopyFrom(draw(bad_tensor(rows)))
    return seq


def outside(lo: int, hi: int) -> st.SearchStrategy[int]:
    """int32 values outside [lo, hi]: just below, just above, anywhere."""
    return st.one_of(
        st.integers(lo - 3, lo - 1), st.integers(hi + 1, hi + 3), INT32.filter(lambda v: not lo <= v <= hi)
    )


def pick(draw, broken: set[str], name: str, good: st.SearchStrategy, bad: st.SearchStrategy):
    return draw(bad if name in broken else good)


@st.composite
def score_request(draw, request_id=st.text(max_size=8)) -> pb.ScoreRequest:
    fields = ["sequences", "signal", "top_k", "temperature", "value_dtype", "num_samples"]
    broken = draw(st.sets(st.sampled_from(fields), max_size=2))
    signal = draw(st.sampled_from(SIGNALS))
    nseq = draw(st.integers(1, 4))
    bad_seq = draw(st.integers(0, nseq - 1)) if "sequences" in broken else -1
    field = functools.partial(pick, draw, broken)
    req = pb.ScoreRequest(
        request_id=draw(request_id),
        sequences=[draw(token_sequence(signal, broken=i == bad_seq)) for i in range(nseq)],
        signal=field("signal", st.just(signal), bad_enum),
        top_k=field("top_k", st.integers(1, 512), outside(1, 512)),
        temperature=field("temperature", st.sampled_from([0.0, 0.5, 1.0, 2.0]), bad_float),
        value_dtype=field(
            "value_dtype", st.sampled_from(VALUE_DTYPES), bad_enum | st.sampled_from(INT_DTYPES)
        ),
        num_samples=field("num_samples", st.integers(1, 64), outside(1, 512)),
        seed=draw(UINT64),
    )
    if "sequences" in broken and draw(st.booleans()):
        del req.sequences[:]  # no sequences at all
    return req


@st.composite
def generate_request(draw) -> pb.GenerateRequest:
    fields = [
        "prompts",
        "max_new_tokens",
        "n",
        "temperature",
        "top_p",
        "top_k_logprobs",
        "top_k",
        "stop",
        "value_dtype",
    ]
    broken = draw(st.sets(st.sampled_from(fields), max_size=2))
    prompts = draw(st.lists(st.lists(valid_id, min_size=1, max_size=10), min_size=1, max_size=3))
    bad_prompts = st.sampled_from([[], [*prompts, []], [[*prompts[0], VOCAB]]])
    field = functools.partial(pick, draw, broken)
    req = pb.GenerateRequest(
        request_id=draw(st.text(max_size=8)),
        prompts=[pb.TokenSequence(token_ids=p) for p in field("prompts", st.just(prompts), bad_prompts)],
        max_new_tokens=field("max_new_tokens", st.integers(1, 6), outside(1, MAX_LEN - 1)),
        n=field("n", st.integers(0, 3), st.integers(-(2**31), -1)),
        temperature=field("temperature", st.sampled_from([0.0, 0.7, 1.0]), bad_float),
        top_p=field("top_p", st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.sampled_from([math.nan, -0.5, 1.5])),
        greedy=draw(st.booleans()),
        top_k_logprobs=field("top_k_logprobs", st.integers(0, 8), outside(0, 512)),
        stop_token_ids=field(
            "stop", st.lists(valid_id, max_size=2), st.lists(bad_id, min_size=1, max_size=2)
        ),
        value_dtype=field("value_dtype", st.sampled_from(VALUE_DTYPES), bad_enum),
        top_k=field("top_k", st.integers(0, 8), outside(0, VOCAB)),
        return_text=draw(st.booleans()),
    )
    if draw(st.booleans()):  # a text prompt (the server tokenizes it), with token ids too at times
        text = pb.TokenSequence(
            text=draw(st.text(max_size=12)), token_ids=draw(st.lists(valid_id, max_size=1))
        )
        req.prompts.append(text)
    seed = draw(st.one_of(st.none(), UINT64))
    if seed is not None:
        req.seed = seed
    return req


# ---- the server and its answers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def channel(hf_teacher):
    with grpc.insecure_channel(hf_teacher.address, options=OPTIONS) as ch:
        yield ch


def method(channel, name: str, kind: str):
    """A raw method of asymkd.v1.Teacher: bytes in, bytes out (no serializer), so anything reaches it."""
    return getattr(channel, kind)(f"/asymkd.v1.Teacher/{name}")


def status_of(call) -> grpc.StatusCode:
    """Run `call` (consuming a response stream); its status code."""
    try:
        result = call()
        if not isinstance(result, bytes):
            for _ in result:
                pass
        event("OK")
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        event(f"{e.code().name}: {e.details()[:40]}")
        assert e.code() in CALLER_ERRORS, f"{e.code().name}: {e.details()}"
        assert e.details(), e.code()  # the refusal says what was wrong
        return e.code()


GOOD = pb.ScoreRequest(
    request_id="good",
    sequences=[pb.TokenSequence(token_ids=[(i * 37) % VOCAB for i in range(30)], score_from=3)],
    top_k=16,
)


def good_answer(channel) -> dict[str, torch.Tensor]:
    raw = method(channel, "Score", "unary_unary")(GOOD.SerializeToString(), timeout=TIMEOUT_S)
    (result,) = pb.ScoreResponse.FromString(raw).results
    return {f.name: tensor_from_proto(v) for f, v in result.ListFields() if isinstance(v, pb.Tensor)}


@pytest.fixture(scope="module")
def before(channel):
    return good_answer(channel)


# ---- the fuzz tests -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(req=score_request())
def test_random_score_requests(channel, before, req):
    score = method(channel, "Score", "unary_unary")
    code = status_of(lambda: score(req.SerializeToString(), timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert req.sequences and all(2 <= len(s.token_ids) <= MAX_LEN for s in req.sequences)
        assert all(0 <= t < VOCAB for s in req.sequences for t in s.token_ids)


@settings(FUZZ, max_examples=60)
@given(reqs=st.lists(score_request(request_id=st.sampled_from(["", "a", "b", "c"])), min_size=1, max_size=4))
def test_random_score_streams_with_empty_and_duplicate_ids(channel, before, reqs):
    stream = method(channel, "ScoreStream", "stream_stream")
    status_of(lambda: stream(iter([r.SerializeToString() for r in reqs]), timeout=TIMEOUT_S))


@settings(FUZZ, max_examples=60)
@given(req=generate_request())
def test_random_generate_requests(channel, before, req):
    generate = method(channel, "Generate", "unary_stream")
    status_of(lambda: generate(req.SerializeToString(), timeout=TIMEOUT_S))


@settings(FUZZ, max_examples=120)
@given(
    name=st.sampled_from(["GetInfo", "Score", "ScoreStream", "Generate"]),
    blobs=st.lists(st.binary(max_size=200), min_size=1, max_size=3),
)
def test_raw_bytes_to_every_method(channel, before, name, blobs):
    if name == "ScoreStream":
        stream = method(channel, name, "stream_stream")
        status_of(lambda: stream(iter(blobs), timeout=TIMEOUT_S))
    else:
        kind = "unary_stream" if name == "Generate" else "unary_unary"
        status_of(lambda: method(channel, name, kind)(blobs[0], timeout=TIMEOUT_S))


# ---- explicit cases: invalid bytes are INVALID_ARGUMENT, named; the server keeps serving ---------------
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message


@pytest.mark.parametrize(
    "name, kind, type_name",
    [
        ("GetInfo", "unary_unary", "GetInfoRequest"),
        ("Score", "unary_unary", "ScoreRequest"),
        ("Generate", "unary_stream", "GenerateRequest"),
    ],
)
def test_invalid_bytes_are_invalid_argument(channel, name, kind, type_name):
    with pytest.raises(grpc.RpcError) as e:
        result = method(channel, name, kind)(CORRUPT, timeout=TIMEOUT_S)
        list(result) if kind == "unary_stream" else None
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert e.value.details().startswith(f"request: not a valid asymkd.v1.{type_name} (")


def test_invalid_bytes_on_a_stream_name_their_position(channel):
    good = [pb.ScoreRequest(request_id=f"ok{i}", sequences=GOOD.sequences, top_k=4) for i in range(2)]
    stream = method(channel, "ScoreStream", "stream_stream")
    answered = []
    with pytest.raises(grpc.RpcError) as e:
        for raw in stream(iter([*(g.SerializeToString() for g in good), CORRUPT]), timeout=TIMEOUT_S):
            answered.append(pb.ScoreResponse.FromString(raw).request_id)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream message 2: not a valid asymkd.v1.ScoreRequest (" in e.value.details()
    assert set(answered) <= {"ok0", "ok1"}


def test_the_server_still_answers_as_before(channel, before, hf_teacher):
    """Runs after the fuzzing in file order, but holds on its own too (the answer is deterministic)."""
    after = good_answer(channel)
    assert after.keys() == before.keys() == {"ids", "logprobs", "tail_logprob", "target_logprob"}
    assert torch.equal(after["ids"], before["ids"])
    for name in ("logprobs", "tail_logprob", "target_logprob"):
        torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=0)
    assert math.isclose(
        float(after["logprobs"][0].exp().sum() + after["tail_logprob"][0].exp()), 1, abs_tol=1e-5
    )
    assert hf_teacher.proc.poll() is None
    log = hf_teacher.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log
