"""The live teacher feed's own logic (exactly-once under failures, ordering, backpressure) and what every teacher
source shares (row layout, handshake).

The teacher here is a stand-in async client (no network, no processes): it completes requests in random
order, answers with values computed from the tokens (so a result can be checked against its batch), and fails
on a script. The real server + client path is covered by tests/integration/test_feed_restart.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from collections import Counter

import grpc
import pytest
import torch

from asymkd.contract import SequenceScores, Signal, TeacherInfo
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import StudentSide
from student_trainer.sources.common import (
    TeacherCompatError,
    TeacherUnreachableError,
    check_teacher_compat,
    fit_teacher_vocab,
    negotiate,
    scatter_scores,
    score_from_rows,
)
from student_trainer.sources.live import TeacherFeed
from teacher_server.client import InvalidRequestError
from teacher_server.client_policy import make_error

V, T, B, K = 50, 12, 3, 4


def make_info(**kw) -> TeacherInfo:
    base = dict(
        model="stand-in", backend="test", vocab_size=V, hidden_size=8, max_seq_len=64, max_top_k=16,
        tokenizer_hash="tok", tensor_parallel_size=1, pipeline_parallel_size=1,
        signals=(Signal.TOP_K, Signal.FULL), dtype="float32", max_request_tokens=4096,
        max_message_bytes=1 << 26, eos_token_ids=(0,), tokenizer_vocab_size=V,
    )  # fmt: skip
    return TeacherInfo(**(base | kw))


def expected_rows(tokens: torch.Tensor, start: int, k: int) -> dict[str, torch.Tensor]:
    """What the stand-in teacher answers for rows start..L-2 of one sequence: a function of the tokens."""
    cur, nxt = tokens[start:-1], tokens[start + 1 :]
    ids = (cur.unsqueeze(1) * 7 + torch.arange(k)) % V
    logprobs = -(torch.arange(k, dtype=torch.float32) + 1.0) - 0.01 * cur.unsqueeze(1).float()
    return {
        "ids": ids,
        "logprobs": logprobs,
        "tail_logprob": torch.full((len(cur),), -0.5),
        "target_logprob": -nxt.float() / V,
    }


class StandInTeacher:
    """Shared state of the stand-in 'server': what was scored, and the failures to inject."""

    def __init__(self, fail_calls=(), error=grpc.StatusCode.UNAVAILABLE, fail_info=(), info=None):
        self.fail_calls = set(fail_calls)  # score_stream calls (0, 1, ...) whose answer is lost after scoring
        self.fail_info = set(fail_info)  # info() calls that fail (0 = the start-up handshake)
        self.error = error
        self.info = info or make_info()
        self.scored: Counter = Counter()  # batch id (first token) -> times scored
        self.answered: list[int] = []  # batch ids in the order their answers completed
        self.calls = self.info_calls = self.clients = 0
        self.client_options: dict = {}

    def client(self, targets, **options):
        self.clients += 1
        self.client_options = options
        return StandInClient(self)


class StandInClient:
    """The subset of AsyncTeacherClient the feed uses: info(), score_stream(), close()."""

    def __init__(self, teacher: StandInTeacher):
        self.t = teacher
        self.closed = False

    def _fail(self, what: str):
        return make_error(self.t.error, f"stand-in {what} failure", "stand-in", what)

    async def info(self):
        call, self.t.info_calls = self.t.info_calls, self.t.info_calls + 1
        if call in self.t.fail_info:
            raise self._fail("GetInfo")
        return self.t.info

    async def score_stream(self, queries, *, max_in_flight, ordered=True):
        assert ordered and not self.closed
        call, self.t.calls = self.t.calls, self.t.calls + 1
        for query in queries:
            await asyncio.sleep(random.uniform(0, 0.01))  # calls complete out of order
            self.t.scored[int(query.seqs[0][0])] += 1
            if call in self.t.fail_calls:  # the teacher did the work, the answer is lost
                raise self._fail("ScoreStream")
            self.t.answered.append(int(query.seqs[0][0]))
            yield [
                SequenceScores(**expected_rows(seq, sf, query.top_k))
                for seq, sf in zip(query.seqs, query.score_from, strict=True)
            ]

    async def close(self):
        self.closed = True


def make_batches(n: int, read_log: list[int] | None = None):
    """n batches; sample_ids[0] (= the first token of row 0) identifies the batch; row 1 has a prompt,
    row 2 no target at all."""
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        ids = torch.randint(1, V, (B, T), generator=gen)
        ids[0, 0] = i  # identifies the batch in the stand-in's log
        mask = torch.ones(B, T - 1, dtype=torch.bool)
        mask[1, :5] = False
        mask[2] = False
        if read_log is not None:
            read_log.append(i)
        yield {"input_ids": ids, "loss_mask": mask, "sample_ids": torch.arange(B) + B * i}


def run_feed(
    teacher: StandInTeacher,
    n: int,
    prefetch: int = 3,
    retry_deadline_s: float = 30.0,
    connect_s: float = 30.0,
) -> list:
    feed = TeacherFeed(
        make_batches(n),
        TeacherSection(
            targets=["127.0.0.1:1"],
            prefetch=prefetch,
            retry_deadline_s=retry_deadline_s,
            connect_timeout_s=connect_s,
        ),
        DistillSection(top_k=K),
        StudentSide(vocab_size=V, tokenizer_hash="tok"),
        client_factory=teacher.client,
        backoff_base_s=0.01,
    )
    try:
        return list(feed)
    finally:
        feed.close()


def check_results(fed: list, n: int) -> None:
    assert [f.index for f in fed] == list(range(n))
    for f in fed:
        ids, mask = f.batch["input_ids"], f.batch["loss_mask"]
        starts, has = score_from_rows(mask)
        for b in range(B):
            if not has[b]:
                assert not f.teacher.valid[b].any()
                continue
            s = int(starts[b])
            want = expected_rows(ids[b], s, K)
            assert f.teacher.valid[b].tolist() == [r >= s for r in range(T - 1)]
            for name, value in want.items():
                torch.testing.assert_close(getattr(f.teacher, name)[b, s:], value)


def test_in_order_exactly_once_with_out_of_order_completion():
    teacher = StandInTeacher()
    fed = run_feed(teacher, 20)
    check_results(fed, 20)
    assert all(c == 1 for c in teacher.scored.values()) and len(teacher.scored) == 20
    assert teacher.answered != sorted(teacher.answered)  # answers really completed out of order


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED], ids=["unavailable", "busy"]
)
def test_retryable_failures_resend_whole_batches_never_skip_or_double(code):
    # calls 2-6 lose their answers, and the teacher is still down at the next two handshakes
    teacher = StandInTeacher(fail_calls={2, 3, 4, 5, 6, 15}, fail_info={1, 2}, error=code)
    fed = run_feed(teacher, 25, retry_deadline_s=30)
    check_results(fed, 25)  # every batch once, in order, with its own answer
    assert len(teacher.scored) == 25
    assert sum(teacher.scored.values()) == 25 + 6  # the six lost answers were computed again, nothing else
    assert teacher.clients == 1  # one client (gRPC reconnects); the handshake is repeated after outages:
    assert teacher.info_calls >= 4  # the start, two failed handshakes, then the one that passed


def test_other_errors_raise_in_the_training_thread_with_status():
    teacher = StandInTeacher(fail_calls={2}, error=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(InvalidRequestError, match="INVALID_ARGUMENT: stand-in ScoreStream failure") as err:
        run_feed(teacher, 10)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_waits_for_a_teacher_that_is_not_up_yet():
    teacher = StandInTeacher(fail_info={0, 1, 2})
    check_results(run_feed(teacher, 4, retry_deadline_s=30), 4)


def test_gives_up_after_the_retry_deadline():
    teacher = StandInTeacher(fail_calls=set(range(3, 1000)), fail_info=set(range(1, 1000)))
    t0 = time.monotonic()
    with pytest.raises(
        TeacherUnreachableError, match=r"teacher\.retry_deadline_s=0\.2\); last: \w+ UNAVAILABLE"
    ):
        run_feed(teacher, 8, retry_deadline_s=0.2)
    assert time.monotonic() - t0 < 10


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_teacher_that_never_comes_up_is_named_at_the_connect_deadline_in_one_line_per_state():
    handler, feed_log = ListHandler(), logging.getLogger("asymkd.student.feed")
    feed_log.addHandler(handler)  # whatever another test did to the `asymkd` loggers' handlers
    teacher = StandInTeacher(fail_info=set(range(1000)))
    t0 = time.monotonic()
    try:
        with pytest.raises(TeacherUnreachableError, match=r"at 127\.0\.0\.1:1 .*connect_timeout_s=0\.3\)"):
            run_feed(teacher, 2, connect_s=0.3)
    finally:
        feed_log.removeHandler(handler)
    assert time.monotonic() - t0 < 10 and teacher.info_calls >= 3  # retried, within the bound
    waits = [m for m in handler.messages if "waiting for the teacher" in m]
    assert len(waits) == 1, handler.messages  # the same failure again is not logged again


def test_backpressure_reads_at_most_prefetch_batches_ahead():
    read: list[int] = []
    teacher = StandInTeacher()
    feed = TeacherFeed(
        make_batches(50, read),
        TeacherSection(targets=["127.0.0.1:1"], prefetch=3),
        DistillSection(top_k=K),
        StudentSide(vocab_size=V, tokenizer_hash="tok"),
        client_factory=teacher.client,
    )
    try:
        it = iter(feed)
        first = next(it)
        time.sleep(0.15)  # the training loop is busy with batch 0
        assert first.index == 0 and len(read) == 1 + 3
        assert feed.depth + feed.in_flight == 3
        for _ in range(5):
            next(it)
        time.sleep(0.15)
        assert len(read) == 6 + 3
    finally:
        feed.close()
    assert not any(t.name == "teacher-feed-r0" for t in threading.enumerate())


def test_wait_ms_measures_the_training_loop_blocking():
    class SlowClient(StandInClient):
        async def score_stream(self, queries, **kw):
            await asyncio.sleep(0.05)
            async for res in super().score_stream(queries, **kw):
                yield res

    teacher = StandInTeacher()
    teacher.client = lambda targets, **o: SlowClient(teacher)
    fed = run_feed(teacher, 3, prefetch=1)
    assert all(f.wait_ms >= 30 for f in fed)


def test_score_from_is_the_first_target_row():
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    score_from, has = score_from_rows(mask)
    assert score_from.tolist() == [0, 2, 3] and has.tolist() == [True, True, False]  # T-2 = 3 if none


def test_scatter_places_rows_after_score_from():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tokens = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    scores = [
        SequenceScores(**expected_rows(tokens[0], 1, 2)),
        SequenceScores(**expected_rows(tokens[1], 3, 2)),
    ]
    out = scatter_scores(scores, mask, top_k=2, vocab_size=V)
    assert out.ids.shape == (2, 4, 2) and out.ids.dtype == torch.int64 and out.tail_logprob.shape == (2, 4)
    assert out.valid.tolist() == [[False, True, True, True], [False] * 4]
    torch.testing.assert_close(out.ids[0, 1:], expected_rows(tokens[0], 1, 2)["ids"])
    torch.testing.assert_close(out.target_logprob[0, 1:], -tokens[0, 2:].float() / V)
    # rows the teacher did not score hold a well-formed placeholder, never NaN
    assert torch.isfinite(out.logprobs).all() and out.full is None


def test_scatter_full_signal():
    mask = torch.tensor([[0, 1, 1]], dtype=torch.bool)
    full = torch.log_softmax(torch.randn(2, 7), -1)
    out = scatter_scores([SequenceScores(full=full)], mask, top_k=K, vocab_size=7)
    assert out.full.shape == (1, 3, 7) and out.ids is None
    torch.testing.assert_close(out.full[0, 1:], full)


def test_compat_accepts_equal_vocab_and_tokenizer():
    check_teacher_compat(make_info(), vocab_size=V, tokenizer_hash="tok", allow_padded_vocab=False)


def test_compat_refuses_another_tokenizer():
    with pytest.raises(TeacherCompatError, match="tokenizer hash 'tok' but the student's is 'other'"):
        check_teacher_compat(make_info(), vocab_size=V, tokenizer_hash="other", allow_padded_vocab=True)


def test_compat_refuses_a_vocab_mismatch_and_names_the_sizes():
    info = make_info(vocab_size=152064, tokenizer_vocab_size=151665)
    with pytest.raises(TeacherCompatError, match=r"152064 != student vocab_size 151936.*allow_padded_vocab"):
        check_teacher_compat(info, vocab_size=151936, tokenizer_hash="tok", allow_padded_vocab=False)


def test_compat_padded_vocab_allowed_when_both_cover_the_tokenizer():
    info = make_info(vocab_size=152064, tokenizer_vocab_size=151665)
    check_teacher_compat(info, vocab_size=151936, tokenizer_hash="tok", allow_padded_vocab=True)
    check_teacher_compat(make_info(vocab_size=151936, tokenizer_vocab_size=151665), vocab_size=152064,
                         tokenizer_hash="tok", allow_padded_vocab=True)  # fmt: skip


def test_compat_padded_vocab_refused_when_the_tokenizer_is_not_covered():
    info = make_info(vocab_size=152064, tokenizer_vocab_size=151665)
    with pytest.raises(TeacherCompatError, match="cover the tokenizer's ids"):
        check_teacher_compat(info, vocab_size=151000, tokenizer_hash="tok", allow_padded_vocab=True)
    with pytest.raises(TeacherCompatError, match="tokenizer_vocab_size=unknown"):
        check_teacher_compat(make_info(vocab_size=64, tokenizer_vocab_size=0), vocab_size=V,
                             tokenizer_hash="tok", allow_padded_vocab=True)  # fmt: skip


def test_wider_teacher_vocab_folds_padded_ids_into_the_tail():
    # teacher top-4 over 8 columns, student has 6: ids 6 and 7 exist only on the teacher side
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1]]))
    ids = torch.tensor([[7, 2, 6, 0], [1, 2, 3, 4]])
    tail = torch.log(torch.tensor([0.2, 0.1]))
    s = fit_teacher_vocab(SequenceScores(ids=ids, logprobs=lp, tail_logprob=tail), vocab_size=6, top_k=2)
    assert s.ids.tolist() == [[2, 0], [1, 2]]
    torch.testing.assert_close(s.logprobs.exp(), torch.tensor([[0.2, 0.1], [0.3, 0.3]]))
    torch.testing.assert_close(s.tail_logprob.exp(), torch.tensor([0.7, 0.4]))  # total mass stays 1
    full = fit_teacher_vocab(SequenceScores(full=torch.log_softmax(torch.randn(3, 8), -1)), 6, 2).full
    assert full.shape == (3, 6) and math.isclose(full.exp().sum(-1)[0].item(), 1.0, rel_tol=1e-5)


def test_handshake_error_raises_at_start():
    teacher = StandInTeacher(info=make_info(tokenizer_hash="other"))
    with pytest.raises(TeacherCompatError, match="tokenizer"):
        run_feed(teacher, 2)


def test_the_feed_gives_its_client_the_configured_deadline_and_retries():
    teacher = StandInTeacher()
    feed = TeacherFeed(
        make_batches(1),
        TeacherSection(targets=["127.0.0.1:1", "127.0.0.1:2"], timeout_s=7.0, max_retries=2),
        DistillSection(top_k=K),
        StudentSide(vocab_size=V, tokenizer_hash="tok"),
        client_factory=teacher.client,
    )
    try:
        assert len(list(feed)) == 1
    finally:
        feed.close()
    assert teacher.client_options == {"timeout_s": 7.0, "max_retries": 2}


def test_handshake_refuses_rows_longer_than_the_teacher_takes():
    student = StudentSide(vocab_size=V, tokenizer_hash="tok", seq_len=65)
    with pytest.raises(TeacherCompatError, match=r"data\.seq_len=65 exceeds the teacher.s max_seq_len=64"):
        negotiate(make_info(), DistillSection(top_k=K), TeacherSection(), student)


def test_handshake_refuses_a_signal_or_top_k_the_teacher_does_not_offer():
    student = StudentSide(vocab_size=V, tokenizer_hash="tok", seq_len=16)
    with pytest.raises(TeacherCompatError, match="does not offer signal FULL"):
        negotiate(
            make_info(signals=(Signal.TOP_K,)), DistillSection(signal="full"), TeacherSection(), student
        )
    with pytest.raises(TeacherCompatError, match="top_k=32 exceeds the teacher's max_top_k=16"):
        negotiate(make_info(), DistillSection(top_k=32), TeacherSection(), student)


def test_handshake_asks_a_wider_teacher_for_room_to_fold_its_padded_ids():
    info = make_info(vocab_size=V + 3, tokenizer_vocab_size=V)
    student = StudentSide(vocab_size=V, tokenizer_hash="tok", seq_len=16)
    padded = TeacherSection(allow_padded_vocab=True)
    assert negotiate(info, DistillSection(top_k=K), padded, student) == K + 3
    assert (
        negotiate(
            make_info(max_top_k=K + 1, vocab_size=V + 3, tokenizer_vocab_size=V),
            DistillSection(top_k=K),
            padded,
            student,
        )
        == K + 1
    )  # fmt: skip  (capped)


def test_the_source_factory_picks_the_configured_source():
    from student_trainer.sources import build_teacher_source
    from student_trainer.sources.base import NoTeacher

    student = StudentSide(vocab_size=V, tokenizer_hash="tok")
    source = build_teacher_source(TeacherSection(), DistillSection(), make_batches(2), student)
    assert isinstance(source, NoTeacher) and source.depth == 0
    got = list(source)
    assert [mb.index for mb in got] == [0, 1] and all(mb.teacher is None for mb in got)
    with pytest.raises(ValueError, match=r"teacher\.cache: .* is not a teacher cache"):  # the cache reader
        build_teacher_source(TeacherSection(cache="/nonexistent"), DistillSection(), make_batches(1), student)
