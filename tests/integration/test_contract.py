"""The wire contract of asymkd.v1.Teacher, checked against real servers on loopback with the raw stubs.

Runs once per backend of conftest.CONTRACT_BACKENDS (values against an in-process transformers forward),
plus a server with tight limits (queue, message and request sizes). Raw stubs on purpose: malformed
requests must reach the server.
"""

from __future__ import annotations

import math
import re
import threading
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asymkd.contract import tokenizer_hash
from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc
from asymkd.wire import tensor_from_proto, tensor_to_proto

VOCAB, HIDDEN, MAX_LEN = 512, 64, 512
TIMEOUT_S = 60
CLIENT_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def connect(address: str) -> teacher_pb2_grpc.TeacherStub:
    return teacher_pb2_grpc.TeacherStub(grpc.insecure_channel(address, options=CLIENT_OPTIONS))


@pytest.fixture(scope="module")
def stub(contract_teacher):
    return connect(contract_teacher.address)


@pytest.fixture(scope="module")
def limited(limited_teacher):
    return connect(limited_teacher.address)


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def request(*seqs, rid: str = "r", **kw) -> pb.ScoreRequest:
    """seqs: id lists, or (ids, score_from) pairs."""
    pairs = [s if isinstance(s, tuple) else (s, 0) for s in seqs]
    kw.setdefault("top_k", 8)
    msgs = [pb.TokenSequence(token_ids=ids, score_from=sf) for ids, sf in pairs]
    return pb.ScoreRequest(request_id=rid, sequences=msgs, **kw)


def tensors(ss: pb.SequenceScores) -> dict[str, torch.Tensor]:
    return {f.name: tensor_from_proto(v, f.name) for f, v in ss.ListFields() if isinstance(v, pb.Tensor)}


def score(stub, *seqs, **kw) -> list[dict[str, torch.Tensor]]:
    resp = stub.Score(request(*seqs, **kw), timeout=TIMEOUT_S)
    return [tensors(r) for r in resp.results]


def still_serving(stub) -> None:
    (out,) = score(stub, [1, 2, 3], signal=pb.TARGET_ONLY)
    assert out["target_logprob"].shape == (2,)


# ---- values ------------------------------------------------------------------------------------------


def test_get_info(stub, tiny_teacher_dir, contract_teacher):
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=TIMEOUT_S)
    assert info.backend == contract_teacher.serve_args[contract_teacher.serve_args.index("--backend") + 1]
    assert (info.vocab_size, info.hidden_size, info.max_seq_len, info.max_top_k) == (
        VOCAB,
        HIDDEN,
        MAX_LEN,
        512,
    )
    assert info.tokenizer_hash == tokenizer_hash(tiny_teacher_dir) != ""
    assert info.dtype == "float32" and info.max_request_tokens == 65536 and info.max_message_bytes == 64 << 20
    assert {pb.TOP_K, pb.TARGET_ONLY, pb.FULL} <= set(info.signals)
    assert info.tensor_parallel_size == info.pipeline_parallel_size == 1


def test_top_k_equals_in_process_forward_with_exact_tail(stub, reference):
    seqs = [rand_ids(n, seed) for seed, n in enumerate([17, 40, 5])]
    resp = stub.Score(request(*seqs, rid="topk", top_k=16), timeout=TIMEOUT_S)
    assert resp.request_id == "topk" and resp.last and len(resp.results) == 3
    for i, (ids, r) in enumerate(zip(seqs, resp.results, strict=True)):
        assert (r.sequence_index, r.first_row) == (i, 0)
        out, ref = tensors(r), reference(ids)
        ref_lp, ref_ids = ref.topk(16, dim=-1)
        assert out["ids"].dtype == torch.int32 and out["ids"].shape == (len(ids) - 1, 16)
        assert torch.equal(out["ids"].long(), ref_ids)
        torch.testing.assert_close(out["logprobs"].double(), ref_lp, atol=1e-4, rtol=0)
        ref_tail = ref.scatter(-1, ref_ids, -math.inf).logsumexp(-1)
        torch.testing.assert_close(out["tail_logprob"].double(), ref_tail, atol=1e-4, rtol=0)
        mass = out["logprobs"].double().exp().sum(-1) + out["tail_logprob"].double().exp()
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)
        targets = torch.tensor(ids[1:])[:, None]
        torch.testing.assert_close(
            out["target_logprob"].double(), ref.gather(-1, targets)[:, 0], atol=1e-4, rtol=0
        )
        assert set(out) == {"ids", "logprobs", "tail_logprob", "target_logprob"}


def test_top_k_of_whole_vocab_has_no_tail(stub):
    (out,) = score(stub, rand_ids(6, 9), top_k=VOCAB)
    assert torch.isneginf(out["tail_logprob"]).all()
    assert (out["logprobs"][:, :-1] >= out["logprobs"][:, 1:]).all()  # descending


def test_target_only_and_full(stub, reference):
    ids = rand_ids(30, 3)
    (tgt,) = score(stub, ids, signal=pb.TARGET_ONLY)
    (full,) = score(stub, ids, signal=pb.FULL)
    assert set(tgt) == {"target_logprob"} and set(full) == {"full", "target_logprob"}
    ref = reference(ids)
    assert full["full"].shape == (29, VOCAB)
    sums = full["full"].double().exp().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    torch.testing.assert_close(full["full"].double(), ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(tgt["target_logprob"], full["target_logprob"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_is_applied_exactly(stub, reference, temperature):
    ids = rand_ids(12, 4)
    (out,) = score(stub, ids, top_k=10, temperature=temperature)
    ref_lp, ref_ids = reference(ids, temperature).topk(10, dim=-1)
    assert torch.equal(out["ids"].long(), ref_ids)
    torch.testing.assert_close(out["logprobs"].double(), ref_lp, atol=1e-4, rtol=0)


def test_score_from_drops_leading_rows(stub):
    ids = rand_ids(30, 5)
    whole, tail = score(stub, ids, (ids, 10), top_k=8)
    assert tail["ids"].shape == (30 - 1 - 10, 8)
    assert torch.equal(tail["ids"], whole["ids"][10:])
    torch.testing.assert_close(tail["logprobs"], whole["logprobs"][10:], atol=1e-4, rtol=0)
    (last_row,) = score(stub, (ids, 28), signal=pb.TARGET_ONLY)
    assert last_row["target_logprob"].shape == (1,)


def test_unary_results_keep_request_order_and_value_dtype(stub):
    seqs = [rand_ids(n, 20 + n) for n in (9, 3, 25, 2)]
    out = score(stub, *seqs, top_k=4, value_dtype=pb.BFLOAT16)
    assert [o["ids"].shape[0] for o in out] == [8, 2, 24, 1]
    assert all(o["logprobs"].dtype == torch.bfloat16 and o["ids"].dtype == torch.int32 for o in out)
    for ids, o in zip(seqs, out, strict=True):  # each result belongs to its own sequence
        (alone,) = score(stub, ids, top_k=4)
        assert torch.equal(o["ids"], alone["ids"])


# ---- ScoreStream ------------------------------------------------------------------------------------


def metric(teacher, name: str, missing: float | None = None) -> float:
    """One sample of the server's Prometheus metrics (`name` may carry a {label="..."} selector); `missing`
    when the sample is not there yet (a labelled counter appears at its first increment), else an error."""
    text = urllib.request.urlopen(
        f"http://127.0.0.1:{teacher.metrics_port}/metrics", timeout=TIMEOUT_S
    ).read()
    m = re.search("^" + re.escape(name) + r" (\S+)$", text.decode(), re.MULTILINE)
    if m is None and missing is not None:
        return missing
    assert m, name
    return float(m.group(1))


def test_score_stream_pipelines_many_requests_each_answered_once(stub, contract_teacher):
    reqs = [request(rand_ids(10 + i, 100 + i), rid=f"s{i}", top_k=8) for i in range(24)]
    batches_before = metric(contract_teacher, "asymkd_teacher_batch_requests_count")
    pieces: dict[str, list[pb.ScoreResponse]] = {}
    for resp in stub.ScoreStream(iter(reqs), timeout=TIMEOUT_S):
        pieces.setdefault(resp.request_id, []).append(resp)
    # pipelined: requests were submitted before earlier ones were answered, so batches coalesced them
    assert metric(contract_teacher, "asymkd_teacher_batch_requests_count") - batches_before < len(reqs)
    assert sorted(pieces) == sorted(r.request_id for r in reqs)
    assert all(len(p) == 1 and p[0].last and len(p[0].results) == 1 for p in pieces.values())
    for req in reqs[:4]:
        unary = stub.Score(req, timeout=TIMEOUT_S).results[0]
        assert torch.equal(tensors(pieces[req.request_id][0].results[0])["ids"], tensors(unary)["ids"])


def reassemble(responses: list[pb.ScoreResponse], name: str, nseq: int) -> list[torch.Tensor]:
    parts: dict[int, list[tuple[int, torch.Tensor]]] = {i: [] for i in range(nseq)}
    for resp in responses:
        for r in resp.results:
            parts[r.sequence_index].append((r.first_row, tensors(r)[name]))
    out = []
    for i in range(nseq):
        rows = sorted(parts[i], key=lambda p: p[0])
        starts = [s for s, _ in rows]
        assert starts == [0, *list(torch.tensor([t.shape[0] for _, t in rows]).cumsum(0)[:-1].tolist())]
        out.append(torch.cat([t for _, t in rows]))
    return out


def test_score_stream_splits_large_full_results_that_reassemble_exactly(stub):
    seqs = [rand_ids(100, 7), rand_ids(60, 8)]
    req = request(*seqs, rid="big", signal=pb.FULL)
    responses = list(stub.ScoreStream(iter([req]), timeout=TIMEOUT_S))
    assert len(responses) > 4  # 64 KiB chunks of 2 KiB rows
    assert [r.last for r in responses] == [False] * (len(responses) - 1) + [True]
    assert all(r.request_id == "big" and r.ByteSize() < 80_000 for r in responses)
    unary = [tensors(r)["full"] for r in stub.Score(req, timeout=TIMEOUT_S).results]
    for got, want in zip(reassemble(responses, "full", 2), unary, strict=True):
        assert torch.equal(got, want)


# ---- Generate ---------------------------------------------------------------------------------------


def generate(stub, prompts, **kw) -> dict[tuple[int, int], list[pb.GenerateResponse]]:
    req = pb.GenerateRequest(request_id="g", prompts=[pb.TokenSequence(token_ids=p) for p in prompts], **kw)
    out: dict[tuple[int, int], list[pb.GenerateResponse]] = {}
    for resp in stub.Generate(req, timeout=TIMEOUT_S):
        assert resp.request_id == "g"
        out.setdefault((resp.prompt_index, resp.sample_index), []).append(resp)
    return out


def test_generate_streams_samples_to_the_end(stub):
    kw = {"max_new_tokens": 5, "n": 2, "seed": 3, "top_k_logprobs": 4}
    out = generate(stub, [rand_ids(4, 1), rand_ids(7, 2)], **kw)
    assert sorted(out) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for chunks in out.values():
        assert [c.finished for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].finish_reason in ("length", "stop")
        tokens = [t for c in chunks for t in c.token_ids]
        assert 1 <= len(tokens) <= 5
        assert all(tensor_from_proto(c.top_ids).shape == (len(c.token_ids), 4) for c in chunks)
        assert all((tensor_from_proto(c.logprobs) <= 0).all() for c in chunks)
    again = generate(stub, [rand_ids(4, 1), rand_ids(7, 2)], **kw)
    assert {k: [c.token_ids for c in v] for k, v in again.items()} == {
        k: [c.token_ids for c in v] for k, v in out.items()
    }


def test_greedy_generate_equals_in_process_argmax(stub, reference):
    prompt = rand_ids(6, 11)
    ((_, chunks),) = generate(stub, [prompt], max_new_tokens=6, greedy=True).items()
    got = [t for c in chunks for t in c.token_ids]
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(len(got)):
            ids.append(int(reference.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_generate_text_prompt_is_tokenized_by_the_server(stub, tiny_teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    text = "def main():\n    return"
    req = pb.GenerateRequest(
        request_id="g",
        prompts=[pb.TokenSequence(text=text), pb.TokenSequence(token_ids=tok.encode(text))],
        max_new_tokens=4,
        greedy=True,
        return_text=True,
    )
    out: dict[int, list[pb.GenerateResponse]] = {}
    for resp in stub.Generate(req, timeout=TIMEOUT_S):
        out.setdefault(resp.prompt_index, []).append(resp)
    by_text, by_ids = ([t for c in out[i] for t in c.token_ids] for i in (0, 1))
    assert by_text == by_ids and by_text
    assert "".join(c.text for c in out[0]) == tok.decode(by_text, skip_special_tokens=True)


# ---- bad input: precise status, field named, server keeps serving ------------------------------------

LONG = list(range(MAX_LEN + 1))
BAD_SCORE = [
    (pb.ScoreRequest(request_id="x"), "INVALID_ARGUMENT", "sequences"),
    (request([]), "INVALID_ARGUMENT", "sequences[0].token_ids"),
    (request([1, 2], [5]), "INVALID_ARGUMENT", "sequences[1].token_ids"),
    (request([1, 2, VOCAB]), "INVALID_ARGUMENT", "sequences[0].token_ids[2]: id 512 >= vocab_size 512"),
    (request([1, -4, 2]), "INVALID_ARGUMENT", "sequences[0].token_ids[1]: id -4 < 0"),
    (request([x % VOCAB for x in LONG]), "INVALID_ARGUMENT", "max_seq_len 512"),
    (request(([1, 2, 3, 4], 3)), "INVALID_ARGUMENT", "sequences[0].score_from: 3 not in [0, 2]"),
    (request(([1, 2, 3, 4], -1)), "INVALID_ARGUMENT", "sequences[0].score_from"),
    (request([1, 2], top_k=0), "INVALID_ARGUMENT", "top_k: 0 not in [1, 512]"),
    (request([1, 2], top_k=513), "INVALID_ARGUMENT", "top_k: 513"),
    (request([1, 2], temperature=-1.0), "INVALID_ARGUMENT", "temperature"),
    (request([1, 2], temperature=math.nan), "INVALID_ARGUMENT", "temperature: nan"),
    (request([1, 2], temperature=math.inf), "INVALID_ARGUMENT", "temperature: inf"),
    (request([1, 2], signal=42), "INVALID_ARGUMENT", "signal: unknown value 42"),
    (request([1, 2], value_dtype=42), "INVALID_ARGUMENT", "value_dtype: unknown value 42"),
    (request([1, 2], value_dtype=pb.INT32), "INVALID_ARGUMENT", "value_dtype: INT32"),
    (request([1, 2, 3], signal=pb.AT_IDS), "INVALID_ARGUMENT", "sequences[0].at_ids"),
    (request([1, 2], signal=pb.SAMPLED, num_samples=0), "INVALID_ARGUMENT", "num_samples"),
    (request(*[[1] * 500] * 132), "RESOURCE_EXHAUSTED", "66000 tokens exceed --max-request-tokens 65536"),
]


@pytest.mark.parametrize("req, code, text", BAD_SCORE, ids=[t for _, _, t in BAD_SCORE])
def test_bad_score_request_is_rejected_precisely(stub, req, code, text):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(req, timeout=TIMEOUT_S)
    assert e.value.code().name == code, e.value.details()
    assert text in e.value.details()
    still_serving(stub)


def test_bad_at_ids_shape_names_the_field(stub):
    req = request([1, 2, 3, 4], signal=pb.AT_IDS)
    req.sequences[0].at_ids.CopyFrom(tensor_to_proto(torch.zeros(2, 3, dtype=torch.int32)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(req, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sequences[0].at_ids.shape: [2, 3] is not [R=3, m]" in e.value.details()


def gen_request(*prompts, **kw):
    kw.setdefault("max_new_tokens", 3)
    return pb.GenerateRequest(request_id="g", prompts=[pb.TokenSequence(token_ids=p) for p in prompts], **kw)


BAD_GENERATE = [
    (gen_request(), "prompts"),
    (gen_request([]), "prompts[0].token_ids"),
    (gen_request([1, VOCAB]), "prompts[0].token_ids[1]"),
    (gen_request([1], max_new_tokens=0), "max_new_tokens: 0"),
    (gen_request([1] * 510, max_new_tokens=5), "max_new_tokens 5 > max_seq_len 512"),
    (gen_request([1], n=-2), "n: -2"),
    (gen_request([1], top_p=1.5), "top_p: 1.5"),
    (gen_request([1], temperature=math.nan), "temperature: nan"),
    (gen_request([1], top_k_logprobs=513), "top_k_logprobs: 513"),
    (gen_request([1], top_k=513), "top_k: 513 not in [0, 512]"),
]


@pytest.mark.parametrize("req, text", BAD_GENERATE, ids=[t for _, t in BAD_GENERATE])
def test_bad_generate_request_is_rejected_precisely(stub, req, text):
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, timeout=TIMEOUT_S))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert text in e.value.details()
    still_serving(stub)


@pytest.mark.parametrize(
    "bad, text",
    [
        (request([1, 2], rid="bad", top_k=0), "request 'bad': top_k: 0"),
        (request([1, 2], rid=""), "request_id"),
    ],
    ids=["bad-top-k", "no-request-id"],
)
def test_bad_request_on_a_stream_ends_it_with_that_requests_status(stub, bad, text):
    good = [request(rand_ids(8, i), rid=f"ok{i}") for i in range(3)]
    call = stub.ScoreStream(iter([*good, bad]), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as e:
        for resp in call:
            assert resp.request_id.startswith("ok")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in e.value.details()
    still_serving(stub)


def test_client_disconnect_mid_stream_leaves_the_server_serving(stub, contract_teacher):
    release = threading.Event()

    def requests():
        yield request(rand_ids(20, 1), rid="first")
        release.wait(TIMEOUT_S)  # keep the stream open without sending more

    call = stub.ScoreStream(requests(), timeout=TIMEOUT_S)
    assert next(call).request_id == "first"
    call.cancel()
    release.set()
    gen = stub.Generate(gen_request(rand_ids(4, 2), max_new_tokens=400), timeout=TIMEOUT_S)
    next(gen)
    gen.cancel()
    for _ in range(3):
        still_serving(stub)
    log = contract_teacher.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log


# ---- limits ------------------------------------------------------------------------------------------


def test_response_over_the_message_limit_is_resource_exhausted_but_streams(limited):
    seqs = [rand_ids(200, s) for s in range(4)]  # 796 FULL rows × 2 KiB > 1 MiB
    req = request(*seqs, rid="huge", signal=pb.FULL)
    with pytest.raises(grpc.RpcError) as e:
        limited.Score(req, timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1048576" in e.value.details() and "ScoreStream" in e.value.details()
    assert ("grpc-retry-pushback-ms", "-1") in e.value.trailing_metadata()
    responses = list(limited.ScoreStream(iter([req]), timeout=TIMEOUT_S))
    assert [t.shape[0] for t in reassemble(responses, "full", 4)] == [199] * 4


def test_request_over_the_message_limit_is_resource_exhausted(limited):
    with pytest.raises(grpc.RpcError) as e:
        limited.Score(request([300] * 700_000), timeout=TIMEOUT_S)  # ~1.4 MB > 1 MiB + margin
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as e:
        limited.Score(request(*[[1] * 500] * 9), timeout=TIMEOUT_S)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4500 tokens exceed --max-request-tokens 4096" in e.value.details()
    assert ("grpc-retry-pushback-ms", "-1") in e.value.trailing_metadata()  # no retry can fix it
    with pytest.raises(grpc.RpcError) as e:
        list(limited.ScoreStream(iter([request(*[[1] * 500] * 9, rid="big")]), timeout=TIMEOUT_S))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "-1") in e.value.trailing_metadata()
    still_serving(limited)


def test_full_queue_is_resource_exhausted_at_once(limited):
    futures = [limited.Score.future(request(rand_ids(8, i)), timeout=TIMEOUT_S) for i in range(6)]
    codes, details, trailing = [], [], []
    for f in futures:
        try:
            f.result()
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            details.append(e.details())
            trailing += [key for key, _ in e.trailing_metadata()]
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    assert all("teacher queue full" in d and "retry with backoff" in d for d in details)
    assert "grpc-retry-pushback-ms" not in trailing  # a full queue is worth retrying
    still_serving(limited)


# ---- health, reflection, metrics -------------------------------------------------------------------


def test_health_and_reflection(contract_teacher):
    channel = grpc.insecure_channel(contract_teacher.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "asymkd.v1.Teacher"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (reply,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in reply.list_services_response.service}
    assert {"asymkd.v1.Teacher", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_metrics_count_requests_tokens_and_batches(stub, contract_teacher):
    ok, bad = (f'asymkd_teacher_requests_total{{code="{c}",rpc="Score"}}' for c in ("OK", "INVALID_ARGUMENT"))
    before = {name: metric(contract_teacher, name, missing=0.0) for name in (ok, bad)}
    score(stub, rand_ids(10, 0), top_k=4)
    with pytest.raises(grpc.RpcError):
        stub.Score(request([1, 2, VOCAB]), timeout=TIMEOUT_S)  # id out of range
    assert metric(contract_teacher, ok) == before[ok] + 1
    assert metric(contract_teacher, bad) == before[bad] + 1
    assert metric(contract_teacher, "asymkd_teacher_tokens_scored_total") >= 10
    assert metric(contract_teacher, "asymkd_teacher_batch_tokens_count") >= 1
    assert metric(contract_teacher, 'asymkd_teacher_request_latency_seconds_count{rpc="Score"}') >= 1
    assert metric(contract_teacher, "asymkd_teacher_queue_depth") == 0
