"""The micro-batcher against a stand-in backend (it records calls; results echo the tokens they score)."""

import asyncio
import time

import grpc
import pytest
import torch

from asymkd.contract import SequenceScores, Signal
from teacher_server.backends.base import ScoreItem, ScoreParams, TeacherBackend
from teacher_server.batching import MicroBatcher
from teacher_server.validation import RequestError

P4 = ScoreParams(signal=Signal.TOP_K, top_k=4)
P8 = ScoreParams(signal=Signal.TOP_K, top_k=8)


class RecordingBackend(TeacherBackend):
    """A collaborator stand-in: records each score call; each result's target_logprob echoes the targets."""

    def __init__(self, delay_s: float = 0.0, fail_params: ScoreParams | None = None):
        self.calls: list[tuple[list[ScoreItem], ScoreParams]] = []
        self.delay_s = delay_s
        self.fail_params = fail_params

    async def score(self, items, params):
        self.calls.append((items, params))
        await asyncio.sleep(self.delay_s)
        if params == self.fail_params:
            raise ValueError("engine rejected this batch")
        return [SequenceScores(target_logprob=it.targets.float()) for it in items]

    def generate(self, prompts, params):
        raise NotImplementedError

    def call_tokens(self) -> list[int]:
        return [sum(it.token_ids.numel() for it in items) for items, _ in self.calls]


def items_of(*lengths: int, start: int = 0) -> list[ScoreItem]:
    """Sequences whose tokens identify them: start, start+1, ... (so results can be traced back)."""
    out = []
    for n in lengths:
        out.append(ScoreItem(token_ids=torch.arange(start, start + n)))
        start += n
    return out


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def started(backend, **kw) -> MicroBatcher:
    kw = {"max_batch_tokens": 1000, "max_wait_ms": 20, "max_queue_requests": 64, **kw}
    b = MicroBatcher(backend, **kw)
    await b.start()
    return b


def test_concurrent_small_requests_share_one_engine_call_and_get_their_own_results():
    async def main():
        backend = RecordingBackend()
        b = await started(backend)
        reqs = [items_of(3, 5, start=100 * i) for i in range(6)]
        results = await asyncio.gather(*(b.submit(r, P4) for r in reqs))
        await b.close()
        return backend, reqs, results

    backend, reqs, results = run(main())
    assert len(backend.calls) == 1 and len(backend.calls[0][0]) == 12
    for items, res in zip(reqs, results, strict=True):
        assert [r.target_logprob.tolist() for r in res] == [it.targets.float().tolist() for it in items]


def test_token_budget_is_respected_and_an_oversized_request_runs_alone():
    async def main():
        backend = RecordingBackend()
        b = await started(backend, max_batch_tokens=10)
        sizes = [4, 4, 4, 25, 4, 4]
        out = await asyncio.gather(*(b.submit(items_of(n, start=100 * i), P4) for i, n in enumerate(sizes)))
        await b.close()
        return backend, out

    backend, out = run(main())
    assert all(len(r) == 1 for r in out)
    tokens = backend.call_tokens()
    # oldest first: (4+4), (4 + a later 4 that still fits), the 25-token one alone, then the last 4
    assert tokens == [8, 8, 25, 4]
    assert [len(items) for items, _ in backend.calls] == [2, 2, 1, 1]


def test_requests_are_grouped_by_equal_params():
    async def main():
        backend = RecordingBackend()
        b = await started(backend)
        params = [P4, P8, P4, P8, P4]
        await asyncio.gather(*(b.submit(items_of(3, start=10 * i), p) for i, p in enumerate(params)))
        await b.close()
        return backend

    backend = run(main())
    assert sorted((p.top_k, len(items)) for items, p in backend.calls) == [(4, 3), (8, 2)]


def test_a_lone_request_waits_at_most_max_wait():
    async def main(wait_ms):
        b = await started(RecordingBackend(), max_wait_ms=wait_ms)
        t0 = time.perf_counter()
        await b.submit(items_of(3), P4)
        took = time.perf_counter() - t0
        await b.close()
        return took

    assert 0.095 <= run(main(100)) < 1.0
    assert run(main(0)) < 0.09


def test_a_full_budget_is_dispatched_without_waiting():
    async def main():
        b = await started(RecordingBackend(), max_batch_tokens=8, max_wait_ms=5000)
        t0 = time.perf_counter()
        await asyncio.gather(b.submit(items_of(4), P4), b.submit(items_of(4), P4))
        took = time.perf_counter() - t0
        await b.close()
        return took

    assert run(main()) < 1.0


def test_queue_full_is_resource_exhausted_at_once_and_frees_up_again():
    async def main():
        backend = RecordingBackend()
        b = await started(backend, max_queue_requests=2, max_wait_ms=300)
        waiting = [asyncio.create_task(b.submit(items_of(3), P4)) for _ in range(2)]
        await asyncio.sleep(0)
        assert b.queue_depth == 2
        t0 = time.perf_counter()
        with pytest.raises(RequestError) as e:
            await b.submit(items_of(3), P4)
        assert time.perf_counter() - t0 < 0.2  # not after the 300 ms wait
        await asyncio.gather(*waiting)
        assert b.queue_depth == 0
        await b.submit(items_of(3), P4)  # room again
        await b.close()
        return e.value

    err = run(main())
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "teacher queue full (2 requests" in str(err) and "retry with backoff" in str(err)


def test_queue_token_bound():
    async def main():
        b = await started(RecordingBackend(), max_queue_tokens=10, max_wait_ms=100)
        first = asyncio.create_task(b.submit(items_of(8), P4))
        await asyncio.sleep(0)
        with pytest.raises(RequestError, match="queue full"):
            await b.submit(items_of(3), P4)
        await first
        await b.close()

    run(main())


def test_cancelled_queued_request_leaves_the_queue_without_breaking_the_batch():
    async def main():
        backend = RecordingBackend()
        depths = []
        b = await started(backend, max_wait_ms=50, on_queue_depth=depths.append)
        tasks = [asyncio.create_task(b.submit(items_of(3, start=10 * i), P4)) for i in range(3)]
        await asyncio.sleep(0.01)
        tasks[1].cancel()
        await asyncio.sleep(0)
        assert b.queue_depth == 2
        done = await asyncio.gather(tasks[0], tasks[2])
        assert tasks[1].cancelled()
        await b.close()
        return backend, done, depths

    backend, done, depths = run(main())
    assert len(backend.calls) == 1
    assert [it.token_ids[0].item() for it in backend.calls[0][0]] == [0, 20]
    assert [r[0].target_logprob[0].item() for r in done] == [1.0, 21.0]
    assert depths[:4] == [1, 2, 3, 2] and depths[-1] == 0


def test_cancelled_dispatched_request_does_not_disturb_its_batch_mates():
    async def main():
        backend = RecordingBackend(delay_s=0.05)
        b = await started(backend, max_wait_ms=0)
        a = asyncio.create_task(b.submit(items_of(3), P4))
        c = asyncio.create_task(b.submit(items_of(3, start=50), P4))
        await asyncio.sleep(0.02)  # both dispatched, engine busy
        a.cancel()
        res = await c
        await b.close()
        return a, res

    a, res = run(main())
    assert a.cancelled() and res[0].target_logprob.tolist() == [51.0, 52.0]


def test_engine_error_fails_only_its_batch():
    async def main():
        backend = RecordingBackend(fail_params=P8)
        b = await started(backend)
        ok = b.submit(items_of(3), P4)
        bad = b.submit(items_of(3), P8)
        res = await asyncio.gather(ok, bad, return_exceptions=True)
        after = await b.submit(items_of(3), P4)  # the batcher keeps working
        await b.close()
        return res, after

    (ok, bad), after = run(main())
    assert isinstance(ok, list) and len(ok) == 1 and len(after) == 1
    assert isinstance(bad, ValueError)


def test_wrong_result_count_from_engine_is_an_error_for_that_batch():
    class ShortBackend(RecordingBackend):
        async def score(self, items, params):
            return []

    async def main():
        b = await started(ShortBackend())
        with pytest.raises(RuntimeError, match="0 results for 1 sequences"):
            await b.submit(items_of(3), P4)
        await b.close()

    run(main())


def test_close_fails_waiting_requests_with_unavailable_and_submit_before_start_is_refused():
    async def main():
        b = MicroBatcher(RecordingBackend(), max_batch_tokens=100, max_wait_ms=5000, max_queue_requests=4)
        with pytest.raises(RequestError) as e:
            await b.submit(items_of(3), P4)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        await b.start()
        waiting = asyncio.create_task(b.submit(items_of(3), P4))
        await asyncio.sleep(0.01)
        await b.close()
        with pytest.raises(RequestError) as e:
            await waiting
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

    run(main())


def test_batch_stats_and_callback():
    async def main():
        seen = []
        b = await started(RecordingBackend(), on_batch=lambda *a: seen.append(a))
        await asyncio.gather(b.submit(items_of(3, 4), P4), b.submit(items_of(5), P4))
        await b.close()
        return b.stats, seen

    stats, seen = run(main())
    assert seen == [(2, 3, 12)]
    assert (stats.batches, stats.requests, stats.sequences, stats.tokens) == (1, 2, 3, 12)
