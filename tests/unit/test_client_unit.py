"""Teacher client without a server: request building, response decoding and reassembly (asymkd.wire), how the
client sets up gRPC (one target for every replica, the service config: balancing, health checks, retry
policy), and how a failed call is classified (client_policy). The retries themselves are gRPC's: they are
tested against servers on loopback in tests/integration/test_client.py."""

import json

import grpc
import grpc.aio
import pytest
import torch

from asymkd.contract import GenerateChunk, Signal
from asymkd.v1 import teacher_pb2 as pb
from asymkd.wire import (
    DataLossError,
    ScoreAssembly,
    ScoreQuery,
    collect_samples,
    decode_pieces,
    decode_score_response,
    expected_rows,
    generate_request,
    info_from_proto,
    info_to_proto,
    resolve_signal,
    tensor_from_proto,
    tensor_to_proto,
)
from teacher_server.client import AsyncTeacherClient
from teacher_server.client_policy import (
    InvalidRequestError,
    TeacherError,
    TeacherOverloadedError,
    TeacherTimeoutError,
    TeacherUnavailableError,
    channel_target,
    error_from_rpc,
    is_retryable,
    pushback_ms,
    service_config,
)

Code = grpc.StatusCode
NOT_RETRYABLE = (("grpc-retry-pushback-ms", "-1"),)  # what the server sends with a too-big refusal


# ------------------------------------------------------------------------------------ request building
def test_score_from_forms():
    seqs = [[1, 2, 3, 4], torch.tensor([5, 6, 7])]
    assert [s.score_from for s in ScoreQuery(seqs).to_proto().sequences] == [0, 0]
    assert [s.score_from for s in ScoreQuery(seqs, score_from=1).to_proto().sequences] == [1, 1]
    req = ScoreQuery(seqs, score_from=[2, 0]).to_proto("r1")
    assert [s.score_from for s in req.sequences] == [2, 0]
    assert req.request_id == "r1"
    assert list(req.sequences[1].token_ids) == [5, 6, 7]
    assert expected_rows(req) == [1, 2]
    with pytest.raises(ValueError, match="score_from: 1 values for 2 sequences"):
        ScoreQuery(seqs, score_from=[1]).to_proto()


def test_token_ids_must_be_1d_integers():
    with pytest.raises(ValueError, match=r"seqs\[0\]"):
        ScoreQuery([torch.ones(2, 3, dtype=torch.long)]).to_proto()
    with pytest.raises(ValueError, match=r"seqs\[0\]"):
        ScoreQuery([torch.ones(3)]).to_proto()


@pytest.mark.parametrize(
    "name, signal", [("top_k", Signal.TOP_K), ("FULL", Signal.FULL), ("target_only", Signal.TARGET_ONLY)]
)
def test_signals_by_name(name, signal):
    assert resolve_signal(name) == signal
    assert resolve_signal(signal) == signal
    assert resolve_signal(int(signal)) == signal
    assert ScoreQuery([[1, 2]], signal=name).to_proto().signal == int(signal)


def test_unknown_signal_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown name 'topk'.*top_k"):
        resolve_signal("topk")


def test_top_k_is_sent_only_for_top_k():
    assert ScoreQuery([[1, 2]], top_k=7).to_proto().top_k == 7
    assert ScoreQuery([[1, 2]], top_k=7, signal="full").to_proto().top_k == 0


@pytest.mark.parametrize(
    "dtype, code",
    [(torch.float32, pb.FLOAT32), (torch.bfloat16, pb.BFLOAT16), ("float16", pb.FLOAT16)],
)
def test_value_dtype(dtype, code):
    req = ScoreQuery([[1, 2]], value_dtype=dtype, temperature=2.0).to_proto()
    assert req.value_dtype == code and req.temperature == 2.0


def test_value_dtype_rejects_integers():
    with pytest.raises(ValueError, match="value_dtype"):
        ScoreQuery([[1, 2]], value_dtype=torch.int32).to_proto()


def test_at_ids_travel_as_int32_tensors():
    at = torch.tensor([[3, 4], [5, 6]])
    req = ScoreQuery([[1, 2, 3]], signal="at_ids", at_ids=[at]).to_proto()
    t = req.sequences[0].at_ids
    assert t.dtype == pb.INT32 and torch.equal(tensor_from_proto(t).long(), at)


def test_generate_request_seed_is_optional():
    req = generate_request([[1, 2], torch.tensor([3])], max_new_tokens=5, n=2, top_k_logprobs=3)
    assert [list(p.token_ids) for p in req.prompts] == [[1, 2], [3]]
    assert (req.max_new_tokens, req.n, req.top_k_logprobs) == (5, 2, 3)
    assert not req.HasField("seed")
    assert generate_request([[1]], seed=0).HasField("seed")


def test_generate_request_takes_text_prompts():
    req = generate_request(["Once upon", [4, 5]], top_k=7, return_text=True)
    assert (req.prompts[0].text, list(req.prompts[0].token_ids)) == ("Once upon", [])
    assert (req.prompts[1].text, list(req.prompts[1].token_ids)) == ("", [4, 5])
    assert (req.top_k, req.return_text) == (7, True)
    with pytest.raises(ValueError, match="prompts: a list of prompts"):
        generate_request("Once upon")  # one string is not a list of prompts


# ----------------------------------------------------------------------------------- response decoding
def _piece(seq: int, first: int, ids: torch.Tensor, lp: torch.Tensor) -> pb.SequenceScores:
    return pb.SequenceScores(
        sequence_index=seq,
        first_row=first,
        ids=tensor_to_proto(ids.int()),
        logprobs=tensor_to_proto(lp),
        target_logprob=tensor_to_proto(lp[:, 0]),
    )


def test_unary_decoding_widens_ids_and_leaves_absent_fields_none():
    ids, lp = torch.tensor([[3, 1], [0, 2]]), torch.randn(2, 2)
    (res,) = decode_score_response(pb.ScoreResponse(results=[_piece(0, 0, ids, lp)]))
    assert res.ids.dtype == torch.int64 and torch.equal(res.ids, ids)
    assert torch.equal(res.logprobs, lp) and torch.equal(res.target_logprob, lp[:, 0])
    assert res.tail_logprob is None and res.full is None and res.hidden is None
    assert res.num_rows == 2


def test_split_pieces_reassemble_in_row_order():
    ids, lp = torch.arange(10).view(5, 2), torch.randn(5, 2)
    pieces = [_piece(0, 3, ids[3:], lp[3:]), _piece(0, 0, ids[:1], lp[:1]), _piece(0, 1, ids[1:3], lp[1:3])]
    res = decode_pieces(pieces)
    assert torch.equal(res.ids, ids) and torch.equal(res.logprobs, lp)


def test_missing_rows_are_detected():
    ids, lp = torch.arange(10).view(5, 2), torch.randn(5, 2)
    with pytest.raises(DataLossError, match="rows from 1 missing"):
        decode_pieces([_piece(0, 0, ids[:1], lp[:1]), _piece(0, 3, ids[3:], lp[3:])])


def test_assembly_completes_when_every_sequence_has_its_rows():
    full = torch.randn(4, 8)
    asm = ScoreAssembly([3, 1])
    first = pb.SequenceScores(sequence_index=0, first_row=0, full=tensor_to_proto(full[:2]))
    second = pb.SequenceScores(sequence_index=0, first_row=2, full=tensor_to_proto(full[2:3]))
    other = pb.SequenceScores(sequence_index=1, first_row=0, full=tensor_to_proto(full[3:]))
    asm.add(pb.ScoreResponse(request_id="r", results=[first]))
    asm.add(pb.ScoreResponse(request_id="r", results=[other]))
    assert not asm.complete
    asm.add(pb.ScoreResponse(request_id="r", results=[second]))
    assert asm.complete
    a, b = asm.results()
    assert torch.equal(a.full, full[:3]) and torch.equal(b.full, full[3:])


def test_assembly_completes_on_last_and_rejects_bad_sequence_index():
    asm = ScoreAssembly([2])
    asm.add(pb.ScoreResponse(last=True))
    assert asm.complete
    with pytest.raises(DataLossError, match="sequence_index 5"):
        asm.add(pb.ScoreResponse(results=[pb.SequenceScores(sequence_index=5)]))


def test_generated_chunks_concatenate_per_prompt_and_sample():
    def chunk(p, s, toks, finished=False):
        lp = -torch.arange(1.0, len(toks) + 1)
        top = torch.tensor([[t, t + 1] for t in toks])
        return GenerateChunk(
            p, s, toks, lp, top, torch.zeros(len(toks), 2), finished, "stop" if finished else ""
        )

    chunks = [chunk(0, 1, [7]), chunk(0, 0, [1, 2]), chunk(0, 0, [3], True), chunk(0, 1, [8], True)]
    (row,) = collect_samples(chunks, num_prompts=1, n=2)
    assert row[0].token_ids.tolist() == [1, 2, 3] and row[1].token_ids.tolist() == [7, 8]
    assert row[0].logprobs.tolist() == [-1.0, -2.0, -1.0] and row[0].finish_reason == "stop"
    assert row[0].top_ids.shape == (3, 2) and row[1].top_logprobs.shape == (2, 2)


def test_teacher_info_round_trips_and_names_signals():
    msg = pb.TeacherInfo(model="m", backend="hf", vocab_size=10, signals=[pb.TOP_K, pb.FULL], dtype="float32")
    msg.eos_token_ids.append(2)
    msg.signals.append(99)  # a signal a newer server knows: left out, not an error
    info = info_from_proto(msg)
    assert info.signals == (Signal.TOP_K, Signal.FULL) and info.eos_token_ids == (2,)
    assert info.vocab_size == 10 and info.dtype == "float32" and info.note == ""
    again = info_from_proto(info_to_proto(info))
    assert again == info and list(info_to_proto(info).signals) == [pb.TOP_K, pb.FULL]


# ---------------------------------------------------------------------------------------- channel set-up
def test_one_target_goes_to_grpc_as_given():
    assert channel_target(["10.0.0.1:50051"]) == "10.0.0.1:50051"
    assert channel_target(["dns:///teacher-headless.ns.svc:50051"]) == "dns:///teacher-headless.ns.svc:50051"


def test_several_targets_become_one_address_list():
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["[::1]:1", "[fe80::2]:2"]) == "ipv6:[::1]:1,[fe80::2]:2"
    assert channel_target(["localhost:7", "127.0.0.1:8"]).startswith("ipv4:127.0.0.1:7,")  # names resolved


@pytest.mark.parametrize(
    "targets, error",
    [
        ([], "at least one target"),
        (["dns:///a:1", "10.0.0.1:2"], "must be the only target"),
        (["10.0.0.1:1", "no-port"], "is not host:port"),
        (["10.0.0.1:1", "[::1]:2"], "mix IPv4-only and IPv6-only"),
    ],
)
def test_bad_target_lists_are_refused_before_any_call(targets, error):
    with pytest.raises(ValueError, match=error):
        channel_target(targets)
    with pytest.raises(ValueError, match=error):
        AsyncTeacherClient(targets)


def test_service_config_balances_health_checks_and_retries_what_may_succeed():
    config = json.loads(service_config(max_retries=3, backoff_base_s=0.05, backoff_max_s=2.0))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "asymkd.v1.Teacher"}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "asymkd.v1.Teacher"}]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 4 and policy["retryableStatusCodes"] == [
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    ]
    assert (policy["initialBackoff"], policy["maxBackoff"]) == ("0.050s", "2.000s")
    assert json.loads(service_config(9, 0.05, 2.0))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "methodConfig" not in json.loads(service_config(0, 0.05, 2.0))  # no retries at all


# ------------------------------------------------------------------------------------ error classification
@pytest.mark.parametrize(
    "code, retry",
    [
        (Code.UNAVAILABLE, True),
        (Code.RESOURCE_EXHAUSTED, True),
        (Code.INVALID_ARGUMENT, False),
        (Code.DEADLINE_EXCEEDED, False),
        (Code.UNIMPLEMENTED, False),
        (Code.INTERNAL, False),
        (Code.CANCELLED, False),
    ],
)
def test_only_unavailable_and_exhausted_retry(code, retry):
    assert is_retryable(code, "x") is retry


def test_too_large_is_never_retryable():
    assert is_retryable(Code.RESOURCE_EXHAUSTED, "teacher queue full (3 requests); retry with backoff")
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)")
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, "any wording", NOT_RETRYABLE)


def test_the_servers_pushback_decides():
    queue_full = "teacher queue full (3 requests); retry with backoff"
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, queue_full, grpc.aio.Metadata(*NOT_RETRYABLE))
    assert is_retryable(Code.RESOURCE_EXHAUSTED, queue_full, [("grpc-retry-pushback-ms", "250")])
    assert not is_retryable(Code.UNAVAILABLE, "draining", [("grpc-retry-pushback-ms", "x")])  # unparseable
    assert not is_retryable(Code.INVALID_ARGUMENT, "x", [("grpc-retry-pushback-ms", "0")])  # codes first
    assert pushback_ms([("grpc-retry-pushback-ms", b"-1")]) == -1 and pushback_ms(None) is None


def test_grpc_masked_stream_write_failures_may_be_sent_again():
    # https://github.com/grpc/grpc/issues/36066: the real status is lost; a bad request fails again anyway
    assert is_retryable(Code.INTERNAL, "Internal error from Core")
    assert not is_retryable(Code.INTERNAL, "teacher error (KeyError); see the server log")
    # raised as the peer-gone error it most likely is (a stream whose replica was killed hits it at random)
    masked = error_from_rpc(_rpc_error(Code.INTERNAL, "Internal error from Core"), "h:1", "ScoreStream")
    assert isinstance(masked, TeacherUnavailableError) and masked.retryable and masked.code == Code.INTERNAL


def _rpc_error(code: Code, details: str = "boom", trailing=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details)


def test_error_classes_keep_code_details_and_address():
    err = error_from_rpc(_rpc_error(Code.INVALID_ARGUMENT, "sequences[0].token_ids[3]: id 9"), "h:1", "Score")
    assert isinstance(err, InvalidRequestError) and err.code == Code.INVALID_ARGUMENT
    assert "sequences[0].token_ids[3]" in str(err) and "h:1" in str(err) and err.address == "h:1"
    assert isinstance(error_from_rpc(_rpc_error(Code.UNAVAILABLE)), TeacherUnavailableError)
    assert isinstance(error_from_rpc(_rpc_error(Code.DEADLINE_EXCEEDED)), TeacherTimeoutError)
    assert type(error_from_rpc(_rpc_error(Code.INTERNAL))) is TeacherError


def test_errors_carry_the_retry_verdict_from_the_trailing_metadata():
    assert error_from_rpc(_rpc_error(Code.RESOURCE_EXHAUSTED, "teacher queue full")).retryable
    flagged = error_from_rpc(_rpc_error(Code.RESOURCE_EXHAUSTED, "teacher queue full", NOT_RETRYABLE))
    assert isinstance(flagged, TeacherOverloadedError) and not flagged.retryable
    assert not error_from_rpc(_rpc_error(Code.INVALID_ARGUMENT)).retryable
