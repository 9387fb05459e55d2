"""Request validation: every bad input of the contract gets the right status code and names its field."""

import dataclasses
import math

import grpc
import pytest
import torch

from asymkd.contract import Signal, TeacherInfo
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import tensor_to_proto
from teacher_server.validation import (
    Limits,
    RequestError,
    check_response_size,
    estimate_response_bytes,
    parse_generate_request,
    parse_score_request,
)

LIMITS = Limits(
    vocab_size=100,
    hidden_size=16,
    max_seq_len=32,
    max_top_k=8,
    max_request_tokens=64,
    signals=frozenset({Signal.TOP_K, Signal.TARGET_ONLY, Signal.FULL, Signal.AT_IDS, Signal.SAMPLED}),
)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def seq(ids, score_from=0, at_ids=None):
    s = pb.TokenSequence(token_ids=ids, score_from=score_from)
    if at_ids is not None:
        s.at_ids.CopyFrom(at_ids)
    return s


def score_req(*seqs, **kw):
    kw.setdefault("top_k", 4)
    return pb.ScoreRequest(request_id="r", sequences=list(seqs), **kw)


def rejects(fn, req, code, text):
    with pytest.raises(RequestError) as e:
        fn(req, LIMITS)
    assert e.value.code == code, str(e.value)
    assert text in str(e.value), str(e.value)
    return e.value


def test_good_request_becomes_engine_items_and_params():
    items, params = parse_score_request(
        score_req(seq([1, 2, 3]), seq([4, 5, 6, 7], 2), temperature=0), LIMITS
    )
    assert [it.token_ids.tolist() for it in items] == [[1, 2, 3], [4, 5, 6, 7]]
    assert items[0].token_ids.dtype == torch.int64
    assert [it.num_rows for it in items] == [2, 1]
    assert params.signal == Signal.TOP_K and params.top_k == 4
    assert params.temperature == 1.0 and params.value_dtype == torch.float32


def test_unspecified_signal_means_top_k_and_top_k_is_ignored_elsewhere():
    _, params = parse_score_request(score_req(seq([1, 2]), signal=pb.SIGNAL_UNSPECIFIED), LIMITS)
    assert params.signal == Signal.TOP_K
    _, params = parse_score_request(score_req(seq([1, 2]), signal=pb.TARGET_ONLY, top_k=0), LIMITS)
    assert params.signal == Signal.TARGET_ONLY and params.top_k == 0


@pytest.mark.parametrize(
    "req, text",
    [
        (score_req(), "sequences: empty request"),
        (score_req(seq([])), "sequences[0].token_ids: 0 tokens"),
        (score_req(seq([1, 2]), seq([5])), "sequences[1].token_ids: 1 tokens"),
        (score_req(seq([1, 2, 3]), seq([1, 2, 100])), "sequences[1].token_ids[2]: id 100 >= vocab_size 100"),
        (score_req(seq([1, -3, 2])), "sequences[0].token_ids[1]: id -3 < 0"),
        (score_req(seq(list(range(33)))), "sequences[0].token_ids: length 33 > max_seq_len 32"),
        (score_req(seq([1, 2, 3], 2)), "sequences[0].score_from: 2 not in [0, 1]"),
        (score_req(seq([1, 2, 3], -1)), "sequences[0].score_from: -1 not in [0, 1]"),
        (score_req(seq([1, 2]), top_k=0), "top_k: 0 not in [1, 8]"),
        (score_req(seq([1, 2]), top_k=9), "top_k: 9 not in [1, 8]"),
        (score_req(seq([1, 2]), top_k=-1), "top_k: -1 not in [1, 8]"),
        (score_req(seq([1, 2]), temperature=-0.5), "temperature: -0.5 is negative"),
        (score_req(seq([1, 2]), temperature=math.nan), "temperature: nan is not finite"),
        (score_req(seq([1, 2]), temperature=math.inf), "temperature: inf is not finite"),
        (score_req(seq([1, 2]), temperature=1e-30), "temperature: 1e-30 is below the minimum"),
        (score_req(seq([1, 2]), signal=42), "signal: unknown value 42"),
        (score_req(seq([1, 2]), value_dtype=99), "value_dtype: unknown value 99"),
        (score_req(seq([1, 2]), value_dtype=pb.INT32), "value_dtype: INT32 is not a value dtype"),
        (score_req(seq([1, 2]), signal=pb.SAMPLED, num_samples=0), "num_samples: 0 not in [1, 8]"),
        (score_req(seq([1, 2]), signal=pb.SAMPLED, num_samples=9), "num_samples: 9 not in [1, 8]"),
        (
            score_req(seq([1, 2]), pb.TokenSequence(text="hi")),
            "sequences[1].text: Score takes token_ids only",
        ),
    ],
)
def test_bad_score_field_is_invalid_argument_naming_it(req, text):
    rejects(parse_score_request, req, INVALID, text)


def test_first_bad_token_is_named_even_in_a_long_sequence():
    ids = [7] * 30
    ids[17], ids[25] = 100, -1
    err = rejects(parse_score_request, score_req(seq(ids)), INVALID, "sequences[0].token_ids[17]")
    assert err.field == "sequences[0].token_ids[17]"


def test_request_over_token_budget_is_resource_exhausted_with_advice():
    req = score_req(*[seq(list(range(30))) for _ in range(3)])  # 90 tokens > 64
    err = rejects(parse_score_request, req, grpc.StatusCode.RESOURCE_EXHAUSTED, "90 tokens exceed")
    assert "ScoreStream" in str(err)


def test_known_signal_the_backend_lacks_is_unimplemented():
    rejects(
        parse_score_request, score_req(seq([1, 2]), signal=pb.HIDDEN), grpc.StatusCode.UNIMPLEMENTED, "HIDDEN"
    )


def test_unimplemented_signal_carries_the_backend_hint():
    info = TeacherInfo(
        model="m",
        backend="vllm",
        vocab_size=100,
        hidden_size=16,
        max_seq_len=32,
        max_top_k=8,
        tokenizer_hash="",
        dtype="float32",
        signals=(Signal.TOP_K, Signal.TARGET_ONLY),
        note="start with --vllm.runner pooling",
    )
    req = score_req(seq([1, 2]), signal=pb.FULL)
    base = "signal: FULL is not implemented by this teacher (TOP_K, TARGET_ONLY)"
    for note, details in (
        (info.note, f"{base}; start with --vllm.runner pooling"),
        ("", base),  # no hint: nothing appended
    ):
        with pytest.raises(RequestError) as e:
            limits = Limits.from_info(dataclasses.replace(info, note=note), max_request_tokens=64)
            parse_score_request(req, limits)
        assert e.value.code == grpc.StatusCode.UNIMPLEMENTED and str(e.value) == details


def at_ids_tensor(rows, m, dtype=torch.int32, hi=100):
    return tensor_to_proto(torch.randint(0, hi, (rows, m), dtype=dtype))


def test_at_ids_accepted_with_the_right_shape():
    items, params = parse_score_request(
        score_req(seq([1, 2, 3, 4], 1, at_ids_tensor(2, 3)), signal=pb.AT_IDS), LIMITS
    )
    assert params.signal == Signal.AT_IDS and items[0].at_ids.shape == (2, 3)
    assert items[0].at_ids.dtype == torch.int64


@pytest.mark.parametrize(
    "at, text",
    [
        (None, "sequences[0].at_ids: required"),
        (at_ids_tensor(3, 2), "sequences[0].at_ids.shape: [3, 2] is not [R=2, m]"),
        (at_ids_tensor(2, 9), "sequences[0].at_ids.shape: [2, 9]"),
        (
            tensor_to_proto(torch.full((2, 2), 100, dtype=torch.int32)),
            "sequences[0].at_ids[0]: id 100 >= vocab_size",
        ),
        (tensor_to_proto(torch.zeros(2, 2)), "sequences[0].at_ids.dtype"),
        (pb.Tensor(dtype=pb.INT32, shape=[2, 2], data=b"\0" * 3), "sequences[0].at_ids.data"),
    ],
)
def test_bad_at_ids_names_the_field(at, text):
    rejects(parse_score_request, score_req(seq([1, 2, 3, 4], 1, at), signal=pb.AT_IDS), INVALID, text)


def test_response_size_estimate_and_refusal():
    items, params = parse_score_request(score_req(seq(list(range(20))), signal=pb.FULL), LIMITS)
    est = estimate_response_bytes(items, params, LIMITS)
    assert est >= 19 * 100 * 4
    with pytest.raises(RequestError) as e:
        check_response_size(est, 1000, params)
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ScoreStream" in str(e.value) and "TOP_K" in str(e.value)
    check_response_size(est, est, params)


def gen_req(*prompts, **kw):
    kw.setdefault("max_new_tokens", 4)
    return pb.GenerateRequest(request_id="g", prompts=list(prompts), **kw)


def test_good_generate_request():
    prompts, p = parse_generate_request(
        gen_req(seq([1, 2, 3]), top_p=0, n=0, seed=7, top_k_logprobs=3), LIMITS
    )
    assert prompts[0].tolist() == [1, 2, 3]
    assert (p.top_p, p.n, p.seed, p.top_k_logprobs, p.temperature) == (1.0, 1, 7, 3, 1.0)
    _, p = parse_generate_request(gen_req(seq([1])), LIMITS)
    assert p.seed is None


@pytest.mark.parametrize(
    "req, text",
    [
        (gen_req(), "prompts: empty request"),
        (gen_req(seq([])), "prompts[0].token_ids: empty prompt"),
        (gen_req(seq([1, 200])), "prompts[0].token_ids[1]: id 200 >= vocab_size 100"),
        (gen_req(seq([1]), max_new_tokens=0), "max_new_tokens: 0 not in [1, 31]"),
        (
            gen_req(seq([1] * 30), max_new_tokens=3),
            "prompts[0].token_ids: length 30 + max_new_tokens 3 > max_seq_len",
        ),
        (gen_req(seq([1]), n=-1), "n: -1 is negative"),
        (gen_req(seq([1]), top_p=1.5), "top_p: 1.5 not in (0, 1]"),
        (gen_req(seq([1]), top_p=-0.1), "top_p: -0.1 not in (0, 1]"),
        (gen_req(seq([1]), top_p=math.nan), "top_p: nan"),
        (gen_req(seq([1]), temperature=math.inf), "temperature: inf is not finite"),
        (gen_req(seq([1]), top_k_logprobs=9), "top_k_logprobs: 9 not in [0, 8]"),
        (gen_req(seq([1]), stop_token_ids=[3, 100]), "stop_token_ids[1]: id 100"),
        (gen_req(seq([1]), value_dtype=pb.INT64), "value_dtype: INT64 is not a value dtype"),
        (gen_req(seq([1]), top_k=101), "top_k: 101 not in [0, 100]"),
        (gen_req(pb.TokenSequence(text="hi")), "prompts[0].text: this teacher has no tokenizer"),
        (gen_req(pb.TokenSequence(token_ids=[1], text="hi")), "prompts[0]: set token_ids or text, not both"),
        (gen_req(seq([1]), return_text=True), "return_text: this teacher has no tokenizer"),
    ],
)
def test_bad_generate_field_is_invalid_argument_naming_it(req, text):
    rejects(parse_generate_request, req, INVALID, text)


def test_generate_over_token_budget_counts_samples():
    req = gen_req(seq([1] * 10), max_new_tokens=10, n=4)  # 4 × 20 = 80 > 64
    rejects(parse_generate_request, req, grpc.StatusCode.RESOURCE_EXHAUSTED, "80 tokens exceed")


# ---- the servicer's error mapping and result splitting (pure functions, no server) ------------------


def test_exceptions_map_to_status_codes(caplog):
    from teacher_server.backends.base import BackendError, UnsupportedSignal
    from teacher_server.servicer import status_of

    assert status_of(RequestError(grpc.StatusCode.OUT_OF_RANGE, "f", "m"), "Score") == (
        grpc.StatusCode.OUT_OF_RANGE,
        "f: m",
    )
    assert status_of(ValueError("top_k: bad"), "Score") == (INVALID, "top_k: bad")
    assert status_of(UnsupportedSignal("HIDDEN"), "Score")[0] == grpc.StatusCode.UNIMPLEMENTED
    assert status_of(NotImplementedError(), "Score")[0] == grpc.StatusCode.UNIMPLEMENTED
    assert not caplog.records
    code, details = status_of(BackendError("cuda fell over"), "Score")
    assert code == grpc.StatusCode.INTERNAL and "cuda fell over" in details
    assert caplog.records and caplog.records[0].exc_info  # logged with its traceback


def test_split_results_cuts_big_results_by_rows_and_packs_small_ones():
    from asymkd.contract import SequenceScores
    from asymkd.wire import tensor_from_proto
    from teacher_server.servicer import split_results

    big = SequenceScores(full=torch.randn(10, 100), target_logprob=torch.randn(10))  # 404 bytes per row
    small = [SequenceScores(target_logprob=torch.randn(3)) for _ in range(2)]
    groups = list(split_results([small[0], big, small[1]], chunk_bytes=1300))
    pieces = [p for g in groups for p in g]
    assert all(
        sum(tensor_from_proto(p.full).numel() * 4 for p in g if p.HasField("full")) <= 1300 for g in groups
    )
    assert [(p.sequence_index, p.first_row) for p in pieces] == [
        (0, 0),
        (1, 0),
        (1, 3),
        (1, 6),
        (1, 9),
        (2, 0),
    ]
    rows = torch.cat([tensor_from_proto(p.full) for p in pieces if p.sequence_index == 1])
    assert torch.equal(rows, big.full)
    one_row_pieces = list(split_results([big], chunk_bytes=10))  # a row never splits: one row per piece
    assert len(one_row_pieces) == 10
