"""Teacher client without a server: request building, response decoding and reassembly, retry policy,
balancing. The retry loop runs against RPC functions that raise real grpc.aio.AioRpcError objects."""

import asyncio

import grpc
import grpc.aio
import pytest
import torch

from asymkd.v1 import teacher_pb2 as pb
from teacher_server.backends.base import GenerateChunk, Signal
from teacher_server.client import (
    AsyncTeacherClient,
    Balancer,
    InvalidRequestError,
    ScoreAssembly,
    ScoreQuery,
    SequenceScores,
    TeacherError,
    TeacherInfo,
    TeacherOverloadedError,
    TeacherTimeoutError,
    TeacherUnavailableError,
    backoff_s,
    build_generate_request,
    collect_samples,
    decode_pieces,
    decode_score_response,
    error_from_rpc,
    expected_rows,
    is_retryable,
    resolve_signal,
    retryable_flag,
    stream_retry_decision,
)
from teacher_server.wire import from_proto, to_proto

Code = grpc.StatusCode
NOT_RETRYABLE = (("asymkd-retryable", "false"),)  # what the server sends with a too-big refusal


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
    assert t.dtype == pb.INT32 and torch.equal(from_proto(t).long(), at)


def test_generate_request_seed_is_optional():
    req = build_generate_request([[1, 2], torch.tensor([3])], max_new_tokens=5, n=2, top_k_logprobs=3)
    assert [list(p.token_ids) for p in req.prompts] == [[1, 2], [3]]
    assert (req.max_new_tokens, req.n, req.top_k_logprobs) == (5, 2, 3)
    assert not req.HasField("seed")
    assert build_generate_request([[1]], seed=0).HasField("seed")


# ----------------------------------------------------------------------------------- response decoding
def _piece(seq: int, first: int, ids: torch.Tensor, lp: torch.Tensor) -> pb.SequenceScores:
    return pb.SequenceScores(
        sequence_index=seq,
        first_row=first,
        ids=to_proto(ids.int()),
        logprobs=to_proto(lp),
        target_logprob=to_proto(lp[:, 0]),
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
    with pytest.raises(TeacherError, match="rows from 1 missing"):
        decode_pieces([_piece(0, 0, ids[:1], lp[:1]), _piece(0, 3, ids[3:], lp[3:])])


def test_assembly_completes_when_every_sequence_has_its_rows():
    full = torch.randn(4, 8)
    asm = ScoreAssembly([3, 1])
    first = pb.SequenceScores(sequence_index=0, first_row=0, full=to_proto(full[:2]))
    second = pb.SequenceScores(sequence_index=0, first_row=2, full=to_proto(full[2:3]))
    other = pb.SequenceScores(sequence_index=1, first_row=0, full=to_proto(full[3:]))
    asm.add(pb.ScoreResponse(request_id="r", results=[first]))
    asm.add(pb.ScoreResponse(request_id="r", results=[other]))
    assert not asm.complete
    asm.add(pb.ScoreResponse(request_id="r", results=[second]))
    assert asm.complete
    a, b = asm.results()
    assert torch.equal(a.full, full[:3]) and torch.equal(b.full, full[3:])
    asm.reset()
    assert not asm.complete and asm.got == [0, 0]


def test_assembly_completes_on_last_and_rejects_bad_sequence_index():
    asm = ScoreAssembly([2])
    asm.add(pb.ScoreResponse(last=True))
    assert asm.complete
    with pytest.raises(TeacherError, match="sequence_index 5"):
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


def test_teacher_info_names_signals():
    msg = pb.TeacherInfo(model="m", backend="hf", vocab_size=10, signals=[pb.TOP_K, pb.FULL], dtype="float32")
    msg.eos_token_ids.append(2)
    info = TeacherInfo.from_proto(msg)
    assert info.signals == (Signal.TOP_K, Signal.FULL) and info.eos_token_ids == (2,)
    assert info.vocab_size == 10 and info.dtype == "float32"


# ---------------------------------------------------------------------------------------- retry policy
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


def test_too_large_requests_are_not_retried():
    assert is_retryable(Code.RESOURCE_EXHAUSTED, "teacher queue full (3 requests); retry with backoff")
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)")
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, "9000 tokens exceed --max-request-tokens 4096")


def test_server_flag_decides_before_the_details_text():
    queue_full = "teacher queue full (3 requests); retry with backoff"
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, queue_full, NOT_RETRYABLE)
    assert not is_retryable(Code.RESOURCE_EXHAUSTED, "any wording", grpc.aio.Metadata(*NOT_RETRYABLE))
    assert is_retryable(Code.RESOURCE_EXHAUSTED, "over the message limit", [("asymkd-retryable", "true")])
    assert is_retryable(Code.RESOURCE_EXHAUSTED, queue_full, [("other-key", "false")])
    assert not is_retryable(Code.INVALID_ARGUMENT, "x", [("asymkd-retryable", "true")])  # codes come first
    assert retryable_flag([("asymkd-retryable", b"FALSE")]) is False and retryable_flag(None) is None


def test_stream_failures_resend_on_unavailable_and_on_grpc_masked_write_errors():
    assert stream_retry_decision(Code.UNAVAILABLE, "Socket closed") == (True, True)
    assert stream_retry_decision(Code.RESOURCE_EXHAUSTED, "teacher queue full") == (True, False)
    assert stream_retry_decision(Code.INTERNAL, "Internal error from Core") == (True, False)
    assert stream_retry_decision(Code.INTERNAL, "teacher error (KeyError)")[0] is False
    assert stream_retry_decision(Code.INVALID_ARGUMENT, "request 'x' top_k: 0")[0] is False
    assert stream_retry_decision(Code.RESOURCE_EXHAUSTED, "request 'x': too big", NOT_RETRYABLE) == (
        False,
        False,
    )


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (10, 1.0)]:
        delays = [backoff_s(attempt, 0.1, 1.0) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1


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


def _run_call(failures: dict[str, Code | grpc.aio.AioRpcError], max_retries: int = 3, targets=("a:1", "b:2")):
    """Drive AsyncTeacherClient._call over fake RPC functions; returns (result or error, addresses tried)."""
    tried: list[str] = []

    async def fn(rep, timeout_s):
        tried.append(rep.address)
        if rep.address in failures:
            err = failures[rep.address]
            raise err if isinstance(err, grpc.aio.AioRpcError) else _rpc_error(err)
        return "ok"

    async def main():
        client = AsyncTeacherClient(list(targets), max_retries=max_retries, backoff_base_s=0.001)
        try:
            return await client._call("Score", fn), client
        except TeacherError as e:
            return e, client
        finally:
            await client.close()

    result, client = asyncio.run(main())
    return result, tried, client


def test_unavailable_fails_over_to_the_next_replica_and_marks_it_down():
    result, tried, client = _run_call({"a:1": Code.UNAVAILABLE})
    assert result == "ok" and tried == ["a:1", "b:2"]
    assert client.balancer.down_until[0] > 0 and client.balancer.outstanding == [0, 0]


def test_invalid_argument_is_raised_without_retry():
    result, tried, _ = _run_call({"a:1": Code.INVALID_ARGUMENT})
    assert isinstance(result, InvalidRequestError) and tried == ["a:1"]


def test_retries_are_bounded():
    result, tried, _ = _run_call({"a:1": Code.RESOURCE_EXHAUSTED, "b:2": Code.RESOURCE_EXHAUSTED}, 2)
    assert isinstance(result, TeacherOverloadedError)
    assert tried == ["a:1", "b:2", "a:1"]  # first try + max_retries=2, alternating replicas


def test_request_flagged_too_big_is_raised_without_retry():
    too_big = _rpc_error(Code.RESOURCE_EXHAUSTED, "sequences: 9000 tokens exceed the budget", NOT_RETRYABLE)
    result, tried, _ = _run_call({"a:1": too_big, "b:2": too_big})
    assert isinstance(result, TeacherOverloadedError) and not result.retryable and tried == ["a:1"]


# ------------------------------------------------------------------------------------------- balancing
def test_round_robin_among_idle_replicas():
    b = Balancer(3)
    assert [b.pick() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_requests_wins():
    b = Balancer(3)
    for i in (0, 0, 1):
        b.acquire(i)
    assert b.pick() == 2
    b.acquire(2)
    assert b.pick() == 1  # 0 has two outstanding, 1 and 2 one each: rotation goes on from 2
    b.release(0)
    b.release(0)
    assert b.pick() == 0


def test_down_replicas_sit_out_their_cooldown():
    now = [100.0]
    b = Balancer(2, cooldown_s=5.0, clock=lambda: now[0])
    b.mark_down(0)
    assert [b.pick() for _ in range(3)] == [1, 1, 1]
    now[0] += 5.0
    assert sorted(b.pick() for _ in range(2)) == [0, 1]


def test_avoid_and_all_down():
    now = [0.0]
    b = Balancer(2, cooldown_s=5.0, clock=lambda: now[0])
    assert b.pick(avoid=[0]) == 1
    b.mark_down(0)
    now[0] += 1.0
    b.mark_down(1)
    assert b.pick(avoid=[0, 1]) == 0  # everything down and tried: the one back soonest
    assert b.pick(avoid=[1]) == 0  # down but not yet tried beats tried


def test_sequence_scores_alias():
    from teacher_server.client import TopKScores

    assert TopKScores is SequenceScores and SequenceScores().num_rows == 0
