"""The teacher feed against a real teacher server that is killed and restarted on the same port mid-run.

Every batch must come out exactly once, in order, with the same teacher answer as in a run without restart.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from student_trainer.config import DistillSection, TeacherSection
from student_trainer.data import PackedDataset, pack, tokenize_documents
from student_trainer.teacher_feed import TeacherFeed
from teacher_server.launch import LocalTeacher
from teacher_server.models import tokenizer_hash

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
    return TeacherFeed(
        (dataset.batch(i) for i in range(n)),
        TeacherSection(
            targets=[address], prefetch=4, timeout_s=timeout_s, max_retries=2, retry_deadline_s=60
        ),
        DistillSection(top_k=TOP_K),
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_teacher_dir)),
        tokenizer_hash=tokenizer_hash(tiny_teacher_dir),
    )


def test_kill_and_restart_the_teacher_mid_run_loses_and_doubles_nothing(teacher, dataset, tiny_teacher_dir):
    with open_feed(dataset, teacher.address, tiny_teacher_dir) as feed:
        reference = list(feed)
    assert [f.index for f in reference] == list(range(N_BATCHES))

    restarted = threading.Event()

    def restart_later():
        time.sleep(2.0)  # the feed keeps retrying meanwhile
        teacher.start()  # same port
        restarted.set()

    got = []
    with open_feed(dataset, teacher.address, tiny_teacher_dir) as feed:
        for fed in feed:
            got.append(fed)
            if fed.index == 3:
                teacher.kill()
                threading.Thread(target=restart_later, daemon=True).start()
            time.sleep(0.05)  # a training step
        resends = feed.resends
    assert restarted.is_set()
    assert resends >= 1  # batches held at the kill were sent again
    assert [f.index for f in got] == list(range(N_BATCHES))
    for ref, new in zip(reference, got, strict=True):
        assert torch.equal(ref.batch["sample_ids"], new.batch["sample_ids"])
        assert torch.equal(ref.teacher.valid, new.teacher.valid)
        assert ref.teacher.valid.any()
        assert torch.equal(ref.teacher.ids, new.teacher.ids)
        for name in ("logprobs", "tail_logprob", "target_logprob"):
            torch.testing.assert_close(
                getattr(new.teacher, name), getattr(ref.teacher, name), atol=1e-5, rtol=0
            )
    # a wait on the restart shows up as teacher wait in the step that needed it
    assert max(f.wait_ms for f in got) > 1000


def test_training_steps_longer_than_the_teacher_deadline_are_not_teacher_timeouts(
    teacher, dataset, tiny_teacher_dir
):
    """Answers wait in the feed while the training loop is busy; that time is not the teacher's."""
    with open_feed(dataset, teacher.address, tiny_teacher_dir, n=4, timeout_s=1.0) as feed:
        got = []
        for fed in feed:
            got.append(fed.index)
            time.sleep(1.5)  # a training step longer than teacher.timeout_s
    assert got == [0, 1, 2, 3]
