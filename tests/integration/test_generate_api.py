"""The Generate client API against real teacher servers on loopback (hf backend, the tiny Llama).

The main server runs in this process (the real servicer, backend and grpc.aio server, on a loop thread) so
that a test can read the backend's own state: `decode_steps` shows that a cancelled call stops generating.
Text prompts are tokenized by the server (its tokenizer); a server whose model folder has none refuses
them, naming the field. Failover: a replica that refuses before its first chunk (UNAVAILABLE) is retried on
the other by gRPC's retry policy, and a killed replica's calls go to the survivor.
"""

from __future__ import annotations

import asyncio
import shutil
import threading

import grpc
import grpc.aio
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from transformers import AutoTokenizer

from asymkd.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.backends.hf import HFBackend
from teacher_server.client import (
    AsyncTeacherClient,
    InvalidRequestError,
    TeacherClient,
    TeacherOverloadedError,
)
from teacher_server.config import ServeConfig
from teacher_server.launch import LocalTeacher
from teacher_server.registration import add_teacher_servicer
from teacher_server.server import build_batcher
from teacher_server.servicer import TeacherServicer

PROMPT = [5, 6, 7, 8]
NO_STOP = [0]  # the tiny teacher's greedy continuations of PROMPT never produce id 0 (checked below)


class InProcessServer:
    """The real teacher service (TeacherServicer + HFBackend + health) on a loopback port of this process."""

    def __init__(self, model_dir, **cfg):
        self.cfg = ServeConfig(model=str(model_dir), backend="hf", max_top_k=64, **cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(self._start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(300)

    async def _start(self) -> None:
        self.backend = HFBackend(self.cfg)
        await self.backend.start()
        self.servicer = TeacherServicer(self.cfg)
        self.batcher = build_batcher(self.cfg, self.backend, self.servicer.metrics)
        await self.batcher.start()
        self.servicer.attach(self.backend, self.batcher)
        self.server = grpc.aio.server()
        add_teacher_servicer(self.servicer, self.server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        await health.set("asymkd.v1.Teacher", health_pb2.HealthCheckResponse.SERVING)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.batcher.close()
        await self.backend.close()

    def close(self) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def tokens_generated(self) -> float:
        return self.servicer.metrics.registry.get_sample_value("asymkd_teacher_tokens_generated_total")


@pytest.fixture(scope="module")
def server(tiny_teacher_dir):
    s = InProcessServer(tiny_teacher_dir, max_request_tokens=4096)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    with TeacherClient(server.address, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_teacher_dir)


def _greedy(client, n_tokens: int) -> list[int]:
    (samples,) = client.generate([PROMPT], max_new_tokens=n_tokens, greedy=True, stop_token_ids=NO_STOP)
    return samples[0].token_ids.tolist()


def test_seed_makes_samples_reproducible_and_n_gives_distinct_samples(client):
    kw = dict(max_new_tokens=8, n=3, seed=7, temperature=1.0, stop_token_ids=NO_STOP)
    first = client.generate([PROMPT, [9, 10]], **kw)
    again = client.generate([PROMPT, [9, 10]], **kw)
    other = client.generate([PROMPT, [9, 10]], **{**kw, "seed": 8})
    assert [len(row) for row in first] == [3, 3]
    ids = [[s.token_ids.tolist() for s in row] for row in first]
    assert ids == [[s.token_ids.tolist() for s in row] for row in again]
    assert ids != [[s.token_ids.tolist() for s in row] for row in other]
    assert len({tuple(t) for t in ids[0]}) == 3  # the n samples of a prompt are different draws
    for row in first:
        for s in row:
            assert s.token_ids.shape == s.logprobs.shape and torch.all(s.logprobs <= 0)


def test_max_new_tokens_and_stop_token_ids(client):
    greedy = _greedy(client, 12)
    assert len(greedy) == 12 and 0 not in greedy  # NO_STOP never fires for this prompt
    (samples,) = client.generate([PROMPT], max_new_tokens=5, greedy=True, stop_token_ids=NO_STOP)
    assert samples[0].token_ids.tolist() == greedy[:5] and samples[0].finish_reason == "length"
    stop = greedy[6]
    (samples,) = client.generate([PROMPT], max_new_tokens=12, greedy=True, stop_token_ids=[stop, 0])
    cut = greedy.index(stop) + 1  # generation ends with the stop token, included
    assert samples[0].token_ids.tolist() == greedy[:cut] and samples[0].finish_reason == "stop"


def test_sampling_top_k(client):
    greedy = _greedy(client, 10)
    (samples,) = client.generate([PROMPT], max_new_tokens=10, top_k=1, seed=3, stop_token_ids=NO_STOP)
    assert samples[0].token_ids.tolist() == greedy  # top_k=1 sampling is greedy decoding
    (samples,) = client.generate(
        [PROMPT], max_new_tokens=16, n=4, top_k=3, top_k_logprobs=3, seed=3, stop_token_ids=NO_STOP
    )
    for s in samples:  # every token is among the teacher's top 3 at its step
        assert all(t in top.tolist() for t, top in zip(s.token_ids.tolist(), s.top_ids, strict=True))


def test_text_prompts_are_tokenized_by_the_server_and_text_comes_back(client, tokenizer):
    text = "def main():\n    return"
    ids = tokenizer.encode(text)
    kw = dict(max_new_tokens=12, greedy=True, stop_token_ids=[511])
    by_text, by_ids = client.generate([text, ids], return_text=True, **kw)
    assert by_text[0].token_ids.tolist() == by_ids[0].token_ids.tolist()
    assert by_text[0].text == tokenizer.decode(by_text[0].token_ids, skip_special_tokens=True)
    chunks = list(client.generate_stream([text], return_text=True, **kw))
    assert len(chunks) == by_text[0].token_ids.numel() == 12
    assert "".join(c.text for c in chunks) == by_text[0].text
    (plain,) = client.generate([text], **kw)
    assert plain[0].text == ""  # text only when asked for


def test_async_client_takes_token_id_prompts(server):
    async def run():
        async with AsyncTeacherClient(server.address) as c:
            return await c.generate(
                [PROMPT, [1, 2, 3]], n=2, max_new_tokens=4, temperature=0.8, top_p=0.9, seed=11
            )

    out = asyncio.run(run())
    assert [len(row) for row in out] == [2, 2]
    assert all(1 <= s.token_ids.numel() <= 4 for row in out for s in row)


@pytest.mark.parametrize(
    "prompts, kw, field",
    [
        ([PROMPT], dict(top_k=-1), "top_k: -1 not in [0, 512]"),
        ([PROMPT], dict(top_k=513), "top_k: 513 not in [0, 512]"),
        ([PROMPT], dict(top_p=1.5), "top_p: 1.5"),
        ([PROMPT], dict(temperature=-1.0), "temperature: -1 is negative"),
        ([PROMPT], dict(n=-2), "n: -2 is negative"),
        ([PROMPT], dict(max_new_tokens=0), "max_new_tokens: 0 not in"),
        ([PROMPT], dict(stop_token_ids=[3, 9999]), "stop_token_ids[1]: id 9999 >= vocab_size 512"),
        ([PROMPT], dict(top_k_logprobs=65), "top_k_logprobs: 65 not in [0, 64]"),
        ([[]], {}, "prompts[0].token_ids: empty prompt"),
        ([PROMPT, [1, 600]], {}, "prompts[1].token_ids[1]: id 600 >= vocab_size 512"),
        ([""], {}, "prompts[0].token_ids: empty prompt"),
        ([[1] * 500], dict(max_new_tokens=100), "prompts[0].token_ids: length 500 + max_new_tokens 100"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(client, prompts, kw, field):
    with pytest.raises(InvalidRequestError) as err:
        client.generate(prompts, **kw)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details
    assert not err.value.retryable
    assert len(_greedy(client, 2)) == 2  # the server keeps serving


def test_too_much_work_is_resource_exhausted_naming_n(client):
    with pytest.raises(TeacherOverloadedError) as err:  # (4 + 300) × 16 > --max-request-tokens 4096
        client.generate([PROMPT], n=16, max_new_tokens=300)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.retryable
    assert err.value.details.startswith("n: ") and "4096" in err.value.details
    assert len(_greedy(client, 2)) == 2


def test_cancelling_a_stream_frees_the_server_at_once(client, server):
    kw = dict(max_new_tokens=400, n=4, greedy=True, stop_token_ids=NO_STOP)
    before = server.backend.decode_steps
    (full,) = client.generate([PROMPT], **kw)
    full_steps = server.backend.decode_steps - before
    assert full_steps == 400 and all(s.token_ids.numel() == 400 for s in full)

    before = server.backend.decode_steps
    stream = client.generate_stream([PROMPT], **kw)
    first = next(stream)
    assert first.token_ids == full[first.sample_index].token_ids[:1].tolist()
    stream.close()  # cancels the call
    # One worker runs every generation in turn: this call starts only once the cancelled one has stopped.
    assert _greedy(client, 3) == full[0].token_ids[:3].tolist()
    cancelled_steps = server.backend.decode_steps - before - 3
    assert 1 <= cancelled_steps < full_steps // 2  # it stopped early instead of running its 400 steps


def test_cancelling_an_async_call_frees_the_server_at_once(server):
    kw = dict(max_new_tokens=400, n=4, greedy=True, stop_token_ids=NO_STOP)

    async def run() -> list:
        async with AsyncTeacherClient(server.address, timeout_s=120) as c:
            first = asyncio.Event()

            async def consume():
                async for _ in c.generate_stream([PROMPT], **kw):
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()
            task.cancel()  # e.g. the caller's own timeout: the gRPC call is cancelled with it
            with pytest.raises(asyncio.CancelledError):
                await task
            return await c.generate([PROMPT], max_new_tokens=3, greedy=True, stop_token_ids=NO_STOP)

    before = server.backend.decode_steps
    (samples,) = asyncio.run(run())
    assert samples[0].token_ids.numel() == 3
    assert 1 <= server.backend.decode_steps - before - 3 < 200  # not the 400 steps the call asked for


@pytest.fixture(scope="module")
def no_tokenizer_server(tiny_teacher_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for f in tiny_teacher_dir.iterdir():
        if "token" not in f.name and f.is_file():
            shutil.copy(f, folder / f.name)
    s = InProcessServer(folder)
    yield s
    s.close()


def test_text_prompt_without_a_tokenizer_names_the_field(no_tokenizer_server):
    with TeacherClient(no_tokenizer_server.address) as c:
        assert c.info().tokenizer_hash == ""
        with pytest.raises(InvalidRequestError) as err:
            c.generate([PROMPT, "hello"], max_new_tokens=2)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details.startswith("prompts[1].text: this teacher has no tokenizer")
        with pytest.raises(InvalidRequestError, match="return_text: "):
            c.generate([PROMPT], max_new_tokens=2, return_text=True)
        assert c.generate([PROMPT], max_new_tokens=2, greedy=True)[0][0].token_ids.numel() >= 1


class DownForGenerate(pb_grpc.TeacherServicer):
    """A replica that is up (health SERVING) but refuses Generate before its first chunk, e.g. one that is
    going away: UNAVAILABLE, which the client's retry policy sends to another replica."""

    def __init__(self):
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield  # pragma: no cover  (a streaming handler)


def test_generate_fails_over_before_the_first_chunk(client, server, tiny_teacher_dir, tmp_path):
    from tests.integration.test_client import StandInServers

    down = DownForGenerate()
    stand_in = StandInServers(down)
    try:
        expected = _greedy(client, 4)
        done = server.tokens_generated()
        with TeacherClient([stand_in.addresses[0], server.address], backoff_base_s=0.01) as c:
            for _ in range(6):  # round_robin sends about half of them to the refusing replica first
                (samples,) = c.generate([PROMPT], max_new_tokens=4, greedy=True, stop_token_ids=NO_STOP)
                assert samples[0].token_ids.tolist() == expected
                chunks = list(
                    c.generate_stream([PROMPT], max_new_tokens=4, greedy=True, stop_token_ids=NO_STOP)
                )
                assert [t for ch in chunks for t in ch.token_ids] == expected
        assert down.calls >= 1  # it was tried, and its calls were retried on the live replica
        assert server.tokens_generated() - done == 12 * 4
    finally:
        stand_in.close()

    # A replica killed outright: its calls go to the survivor.
    doomed = LocalTeacher(["--model", str(tiny_teacher_dir), "--backend", "hf"], log_path=tmp_path / "d.log")
    doomed.start()
    try:
        with TeacherClient([doomed.address, server.address], backoff_base_s=0.01) as c:
            assert len({c.info().model for _ in range(2)}) == 1  # both replicas connected
            doomed.kill()
            for _ in range(4):
                (samples,) = c.generate([PROMPT], max_new_tokens=4, greedy=True, stop_token_ids=NO_STOP)
                assert samples[0].token_ids.tolist() == expected
    finally:
        doomed.stop()
