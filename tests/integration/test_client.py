"""TeacherClient / AsyncTeacherClient against real teacher servers (hf backend, tiny Llama) on loopback.

Two module-scoped replicas expose Prometheus metrics, so balancing and "no retry" are observed on the
servers themselves; failover kills a third replica of its own mid-stream. The last tests run the client's
gRPC policy (round_robin, health checks, the retry policy, the server's pushback) against stand-in servers
that fail on purpose and count their calls.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
import urllib.request

import grpc
import grpc.aio
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from asymkd.contract import NO_RETRY_METADATA, Signal
from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.client import (
    AsyncTeacherClient,
    InvalidRequestError,
    ScoreQuery,
    TeacherClient,
    TeacherOverloadedError,
    TeacherTimeoutError,
    TeacherUnavailableError,
)
from teacher_server.launch import LocalTeacher, free_port

SERVE = ["--backend", "hf", "--max-top-k", "512", "--max-wait-ms", "1"]


class Replica:
    """A LocalTeacher with its Prometheus port, to count the RPCs it answered."""

    def __init__(self, model_dir, log_path, *extra: str):
        self.metrics_port = free_port()
        args = ["--model", str(model_dir), *SERVE, *extra, "--metrics-port", str(self.metrics_port)]
        self.teacher = LocalTeacher(args, log_path=log_path)

    def count(self, rpc: str, code: str = "OK") -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        pattern = rf'asymkd_teacher_requests_total\{{code="{code}",rpc="{rpc}"\}} (\S+)'
        m = re.search(pattern, text.decode())
        return int(float(m.group(1))) if m else 0


@pytest.fixture(scope="module")
def replicas(tiny_teacher_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("client_logs")
    pair = [Replica(tiny_teacher_dir, logs / f"replica{i}.log") for i in range(2)]
    try:
        for r in pair:
            r.teacher.start()
        yield pair
    finally:
        for r in pair:
            r.teacher.stop()


@pytest.fixture(scope="module")
def client(replicas):
    with TeacherClient([r.teacher.address for r in replicas], timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(reference):
    """conftest's in-process reference in float32, the client's result dtype (assert_close checks it)."""
    return functools.partial(reference, dtype=torch.float32)


def _seqs(n: int, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def _target(reference, seq: list[int]) -> torch.Tensor:
    """(L-1,) reference logprob of each actual next token."""
    return reference(seq).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]


def test_info(client, tiny_teacher_dir):
    info = client.info()
    assert info.backend == "hf" and info.vocab_size == 512 and info.max_top_k == 512
    assert Signal.TOP_K in info.signals and Signal.FULL in info.signals


def test_top_k_matches_transformers(client, reference):
    seqs = [_seqs(1, seed=1)[0] + [5, 6, 7], [3, 1, 4, 1, 5, 9, 2, 6]]
    for temperature in (1.0, 0.7):
        results = client.score(seqs, score_from=[2, 0], top_k=16, temperature=temperature)
        for seq, sf, res in zip(seqs, [2, 0], results, strict=True):
            lp = reference(seq, temperature)[sf:]
            top_lp, top_ids = lp.topk(16, dim=-1)
            assert res.ids.dtype == torch.int64 and torch.equal(res.ids, top_ids)
            torch.testing.assert_close(res.logprobs, top_lp, atol=1e-4, rtol=0)
            tail = torch.logsumexp(lp.scatter(-1, top_ids, float("-inf")), dim=-1)
            torch.testing.assert_close(res.tail_logprob, tail, atol=1e-4, rtol=0)
            target = lp.gather(-1, torch.tensor(seq[sf + 1 :])[:, None])[:, 0]
            torch.testing.assert_close(res.target_logprob, target, atol=1e-4, rtol=0)


def test_full_and_target_only(client, reference):
    seq = [10, 20, 30, 40, 50, 60]
    (full,) = client.score([seq], signal="full", score_from=1)
    assert full.full.shape == (4, 512) and full.ids is None
    torch.testing.assert_close(full.full, reference(seq)[1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(full.full.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    (tgt,) = client.score([seq], signal=Signal.TARGET_ONLY, value_dtype=torch.bfloat16)
    assert tgt.target_logprob.dtype == torch.bfloat16 and tgt.target_logprob.shape == (5,)
    assert tgt.ids is None and tgt.logprobs is None and tgt.full is None
    torch.testing.assert_close(tgt.target_logprob.float(), _target(reference, seq), atol=5e-2, rtol=0)


def test_score_stream_yields_20_results_in_order(client, reference):
    seqs = _seqs(20, seed=2)
    queries = [ScoreQuery([s], signal="target_only") if i % 2 else [s] for i, s in enumerate(seqs)]
    results = list(client.score_stream(iter(queries), max_in_flight=4, top_k=8))
    assert len(results) == 20
    for i, (seq, (res,)) in enumerate(zip(seqs, results, strict=True)):
        assert res.num_rows == len(seq) - 1
        assert (res.ids is None) == bool(i % 2)  # odd ones asked for TARGET_ONLY: proves the order
        torch.testing.assert_close(res.target_logprob, _target(reference, seq), atol=1e-4, rtol=0)


def test_score_stream_unordered_and_large_full_results_split(client, reference):
    seq = list(range(1, 301))  # FULL: 299 rows x 512 x 4 bytes = 612 kB, more than one stream chunk
    out = dict(client.score_stream([[[1, 2, 3]], [seq]], ordered=False, signal="full"))
    assert sorted(out) == [0, 1]
    torch.testing.assert_close(out[1][0].full, reference(seq), atol=1e-4, rtol=0)


def test_generate(client, reference):
    prompt = [5, 6, 7, 8]
    (samples,) = client.generate(
        [prompt], max_new_tokens=6, greedy=True, top_k_logprobs=3, stop_token_ids=[511]
    )
    (s,) = samples
    assert 1 <= s.token_ids.numel() <= 6 and s.finish_reason in ("length", "stop")
    assert s.logprobs.shape == s.token_ids.shape and s.top_ids.shape == (s.token_ids.numel(), 3)
    ref = reference([*prompt, *s.token_ids.tolist()])[len(prompt) - 1 :]
    assert torch.equal(s.token_ids, ref.argmax(-1)[: s.token_ids.numel()])  # greedy = teacher argmax
    assert torch.equal(s.top_ids[:, 0], s.token_ids)
    many = client.generate([prompt, [9, 10]], max_new_tokens=3, n=2, seed=1)
    assert [len(row) for row in many] == [2, 2]
    chunks = list(client.generate_stream([prompt], max_new_tokens=3, seed=1))
    assert chunks[-1].finished and sum(len(c.token_ids) for c in chunks) <= 3


def test_requests_are_balanced_over_both_replicas(client, replicas):
    before = [r.count("Score") for r in replicas]
    for _ in range(6):
        client.score([[1, 2, 3, 4]], top_k=4)
    after = [r.count("Score") for r in replicas]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3]  # sequential calls: round-robin


def test_invalid_argument_names_the_field_and_is_not_retried(client, replicas):
    before = sum(r.count("Score", "INVALID_ARGUMENT") for r in replicas)
    with pytest.raises(InvalidRequestError, match=r"sequences\[1\]\.token_ids\[2\].*vocab_size") as e:
        client.score([[1, 2], [1, 2, 512]], top_k=4)
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert sum(r.count("Score", "INVALID_ARGUMENT") for r in replicas) == before + 1
    with pytest.raises(InvalidRequestError, match="top_k"):
        client.score([[1, 2]], top_k=100_000)
    with pytest.raises(InvalidRequestError, match=r"sequences\[0\]\.token_ids\[1\]"):
        list(client.score_stream([[[1, 2]], [[1, 600]], [[3, 4]]], max_in_flight=2, top_k=4))
    assert client.score([[1, 2]], top_k=4)[0].num_rows == 1  # the servers keep serving


def test_deadline_exceeded_raises(replicas):
    seqs = [list(range(1, 400))] * 16
    with TeacherClient([replicas[0].teacher.address], timeout_s=0.001) as c:
        with pytest.raises(TeacherTimeoutError):
            c.score(seqs, signal="full")
        with pytest.raises(TeacherTimeoutError, match="unanswered"):
            list(c.score_stream([seqs], signal="full"))


def test_async_client_score_and_stream(replicas, client):
    seqs = _seqs(10, seed=3)
    expected = [r.target_logprob for r in client.score(seqs, top_k=8)]

    async def main():
        async with AsyncTeacherClient([r.teacher.address for r in replicas]) as ac:
            info = await ac.info()
            unary = await ac.score(seqs, top_k=8)

            async def queries():
                for s in seqs:
                    yield [s]

            streamed = [res async for (res,) in ac.score_stream(queries(), max_in_flight=3, top_k=8)]
            return info, unary, streamed

    info, unary, streamed = asyncio.run(main())
    assert info.vocab_size == 512
    for e, u, s in zip(expected, unary, streamed, strict=True):  # batch composition moves the last bits
        torch.testing.assert_close(u.target_logprob, e, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.target_logprob, e, atol=1e-5, rtol=0)


def test_unary_calls_fail_over_and_a_broken_stream_says_it_may_be_resent(
    replicas, tiny_teacher_dir, tmp_path
):
    # The doomed replica holds each batch for 3 s, so requests it has been sent are surely unanswered when it
    # is killed. Unary calls go on through the survivor (gRPC's round_robin + retry policy); a ScoreStream
    # call that was on the doomed replica raises a retryable error, having yielded only answered results
    # (resending is the caller's: the trainer's teacher feed does it, tests/integration/test_feed_restart.py).
    doomed = Replica(tiny_teacher_dir, tmp_path / "doomed.log", "--max-wait-ms", "3000")
    doomed.teacher.start()
    try:
        with TeacherClient([doomed.teacher.address], timeout_s=30) as only_doomed:

            def queries():
                for i, s in enumerate(_seqs(6, seed=4)):
                    if i == 3:  # requests 0..2 are out and unanswered
                        doomed.teacher.kill()
                    yield [s]

            got = []
            with pytest.raises(TeacherUnavailableError) as err:
                for res in only_doomed.score_stream(queries(), max_in_flight=4, signal="target_only"):
                    got.append(res)
            assert err.value.retryable and got == []
        with TeacherClient([doomed.teacher.address, replicas[0].teacher.address]) as c:
            for _ in range(4):  # every call reaches the survivor, however the balancer starts
                assert c.score([[1, 2, 3]], top_k=2)[0].ids.shape == (2, 2)
            assert c.info().vocab_size == 512
    finally:
        doomed.teacher.stop()


def test_slow_consumer_of_score_stream_gets_every_answer_without_deadline_errors(replicas):
    """Answers that arrived in time are delivered even when the caller pulls them after timeout_s."""
    with TeacherClient([replicas[0].teacher.address], timeout_s=1.0) as client:
        results = []
        for res in client.score_stream([_seqs(1, seed=i) for i in range(4)], max_in_flight=4, top_k=4):
            results.append(res)
            time.sleep(1.5)  # slower than the deadline: everything still queued must come through
    assert len(results) == 4


# ---- gRPC's balancing, health checks and retries, on stand-in servers (the behaviour is the client's) ------
class StandIn(pb_grpc.TeacherServicer):
    """A Teacher servicer that answers GetInfo with its name, or fails every call with `code` (and, with
    pushback, the server's "do not retry" trailer); it counts the calls it got."""

    def __init__(self, name: str, code: grpc.StatusCode | None = None, pushback: bool = False):
        self.name, self.code, self.pushback, self.calls = name, code, pushback, 0

    async def GetInfo(self, request, context):
        self.calls += 1
        if self.code is not None:
            if self.pushback:
                context.set_trailing_metadata(NO_RETRY_METADATA)
            await context.abort(self.code, f"{self.name} refuses")
        return pb.TeacherInfo(model=self.name)


class StandInServers:
    """grpc.aio servers of StandIn servicers (with a health service) on loopback, on their own loop thread."""

    def __init__(self, *servicers: StandIn):
        self.servicers = servicers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers, self.health, self.addresses = [], [], []
        for s in servicers:
            self._run(self._start(s))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, servicer: StandIn) -> None:
        server = grpc.aio.server()
        pb_grpc.add_TeacherServicer_to_server(servicer, server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("asymkd.v1.Teacher", health_pb2.HealthCheckResponse.SERVING)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers.append(server)
        self.health.append(health)
        self.addresses.append(f"127.0.0.1:{port}")

    def set_serving(self, i: int, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._run(self.health[i].set("asymkd.v1.Teacher", status))

    def close(self) -> None:
        for server in self.servers:
            self._run(server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture()
def stand_ins(request):
    servers = StandInServers(*request.param)
    yield servers
    servers.close()


@pytest.mark.parametrize(
    "stand_ins", [(StandIn("busy", grpc.StatusCode.RESOURCE_EXHAUSTED),)], indirect=True, ids=["busy"]
)
def test_a_full_queue_is_retried_max_retries_times(stand_ins):
    client = TeacherClient(stand_ins.addresses, max_retries=2, backoff_base_s=0.01)
    with client, pytest.raises(TeacherOverloadedError) as err:
        client.info()
    assert err.value.retryable and stand_ins.servicers[0].calls == 3  # 1 + max_retries


@pytest.mark.parametrize(
    "stand_ins",
    [(StandIn("too-big", grpc.StatusCode.RESOURCE_EXHAUSTED, pushback=True),)],
    indirect=True,
    ids=["too-big"],
)
def test_a_refusal_with_the_servers_pushback_is_not_retried(stand_ins):
    client = TeacherClient(stand_ins.addresses, max_retries=3, backoff_base_s=0.01)
    with client, pytest.raises(TeacherOverloadedError) as err:
        client.info()
    assert not err.value.retryable and stand_ins.servicers[0].calls == 1


@pytest.mark.parametrize(
    "stand_ins",
    [(StandIn("a"), StandIn("down", grpc.StatusCode.UNAVAILABLE), StandIn("b"))],
    indirect=True,
    ids=["three"],
)
def test_calls_spread_over_replicas_skip_failing_and_not_serving_ones(stand_ins):
    with TeacherClient(stand_ins.addresses, max_retries=3, backoff_base_s=0.01) as c:
        names = [c.info().model for _ in range(12)]  # "down" fails each call it gets: retried elsewhere
        assert set(names) == {"a", "b"} and names.count("a") >= 4 and names.count("b") >= 4
        stand_ins.set_serving(0, False)  # "a" drains: its health says NOT_SERVING
        time.sleep(0.5)
        calls_a = stand_ins.servicers[0].calls
        assert {c.info().model for _ in range(6)} == {"b"}
        assert stand_ins.servicers[0].calls == calls_a  # not even tried
