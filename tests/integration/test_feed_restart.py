"""The live teacher feed against real teacher servers: one killed and restarted on the same port mid-run, and
one of two replicas killed for good mid-run.

Every batch must come out exactly once, in order, with the same teacher answer as in a run without failure.
"""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest
import torch
from transformers import AutoTokenizer

from asymkd.contract import tokenizer_hash
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.data import PackedDataset, pack, tokenize_documents
from student_trainer.sources.base import StudentSide
from student_trainer.sources.live import TeacherFeed
from teacher_server.launch import LocalTeacher

N_BATCHES, TOP_K = 16, 8


@pytest.fixture(scope="module")
def dataset(tiny_teacher_dir) -> PackedDataset:
    """Real packed batches: docstrings of a few stdlib modules, tokenized with the tiny tokenizer."""
    import argparse
    import json
    import logging

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    docs = [("", m.__doc__ or "") for m in (argparse, json, logging, threading)]
    rows = pack(tokenize_documents(docs, tok), seq_len=48, pad_id=tok.eos_token_id)
    return PackedDataset(rows, micro_batch_size=4, seed=0)


@pytest.fixture()
def teacher(tiny_teacher_dir, tmp_path):
    t = LocalTeacher(
        ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "64"],
        log_path=tmp_path / "teacher.log",
    )
    with t:
        yield t


def open_feed(dataset, address, tiny_teacher_dir, n=N_BATCHES, timeout_s=30.0) -> TeacherFeed:
    addresses = address if isinstance(address, list) else [address]
    return TeacherFeed(
        (dataset.batch(i) for i in range(n)),
        TeacherSection(
            targets=addresses, prefetch=4, timeout_s=timeout_s, max_retries=2, retry_deadline_s=60
        ),
        DistillSection(top_k=TOP_K),
        StudentSide(
            vocab_size=len(AutoTokenizer.from_pretrained(tiny_teacher_dir)),
            tokenizer_hash=tokenizer_hash(tiny_teacher_dir),
        ),
    )


def test_kill_and_restart_the_teacher_mid_run_loses_and_doubles_nothing(teacher, dataset, tiny_teacher_dir):
    with closing(open_feed(dataset, teacher.address, tiny_teacher_dir)) as feed:
        reference = list(feed)
    assert [f.index for f in reference] == list(range(N_BATCHES))

    restarted = threading.Event()

    def restart_later():
        time.sleep(2.0)  # the feed keeps retrying meanwhile
        teacher.start()  # same port
        restarted.set()

    got = []
    with closing(open_feed(dataset, teacher.address, tiny_teacher_dir)) as feed:
        for fed in feed:
            got.append(fed)
            if fed.index == 3:
                teacher.kill()
                threading.Thread(target=restart_later, daemon=True).start()
            time.sleep(0.05)  # a training step
        resends = feed.resends
    assert restarted.is_set()
    assert resends >= 1  # batches held at the kill were sent again
    assert_same_answers(reference, got)
    assert all(f.teacher.valid.any() for f in got)
    # a wait on the restart shows up as teacher wait in the step that needed it
    assert max(f.wait_ms for f in got) > 1000


def test_training_steps_longer_than_the_teacher_deadline_are_not_teacher_timeouts(
    teacher, dataset, tiny_teacher_dir
):
    """Answers wait in the feed while the training loop is busy; that time is not the teacher's."""
    with closing(open_feed(dataset, teacher.address, tiny_teacher_dir, n=4, timeout_s=1.0)) as feed:
        got = []
        for fed in feed:
            got.append(fed.index)
            time.sleep(1.5)  # a training step longer than teacher.timeout_s
    assert got == [0, 1, 2, 3]


def assert_same_answers(reference, got) -> None:
    assert [f.index for f in got] == [f.index for f in reference] == list(range(len(reference)))
    for ref, new in zip(reference, got, strict=True):
        assert torch.equal(ref.batch["sample_ids"], new.batch["sample_ids"])
        assert torch.equal(ref.teacher.valid, new.teacher.valid) and torch.equal(
            ref.teacher.ids, new.teacher.ids
        )
        for name in ("logprobs", "tail_logprob", "target_logprob"):
            torch.testing.assert_close(
                getattr(new.teacher, name), getattr(ref.teacher, name), atol=1e-5, rtol=0
            )


def test_one_of_two_replicas_killed_mid_run_loses_and_doubles_nothing(
    teacher, dataset, tiny_teacher_dir, tmp_path
):
    # The doomed replica holds each batch 3 s: the batches it has been sent are unanswered when it dies, and
    # must be answered once, by the survivor (gRPC's retry of an unanswered call, or the feed's resend).
    with closing(open_feed(dataset, teacher.address, tiny_teacher_dir)) as feed:
        reference = list(feed)
    doomed = LocalTeacher(
        ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "64", "--max-wait-ms", "3000"],
        log_path=tmp_path / "doomed.log",
    )
    with doomed, closing(open_feed(dataset, [doomed.address, teacher.address], tiny_teacher_dir)) as feed:
        got = []
        for fed in feed:
            got.append(fed)
            if fed.index == 1:
                doomed.kill()
    assert_same_answers(reference, got)
