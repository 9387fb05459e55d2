"""The in-process teacher (`teacher.in_process`) against a real teacher server on the same model and batches.

The in-process feed must hand the loss what the served feed hands it (same rows, same tensors), and an
`asymkd train` run with it must give the served run's per-step losses; a teacher that does not match the
student is refused at start, as the GetInfo handshake refuses it.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import closing

import pytest
import torch
from transformers import AutoTokenizer

from asymkd.cli import train as train_main
from asymkd.config import ConfigError
from asymkd.contract import tokenizer_hash
from student_trainer.config import DistillSection, InProcessTeacherSection, TeacherSection
from student_trainer.data import PackedDataset, pack, tokenize_documents
from student_trainer.sources.base import StudentSide
from student_trainer.sources.common import TeacherCompatError
from student_trainer.sources.in_process import InProcessTeacher
from student_trainer.sources.live import TeacherFeed

N_BATCHES, TOP_K, STEPS = 5, 8, 4


def docs() -> list[tuple[str, str]]:
    import argparse
    import json as json_mod
    import logging
    import threading

    return [("", m.__doc__ or "") for m in (argparse, json_mod, logging, threading)]


@pytest.fixture(scope="module")
def teacher(one_thread_teacher):
    return one_thread_teacher


@pytest.fixture(scope="module")
def dataset(tiny_teacher_dir) -> PackedDataset:
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    rows = pack(tokenize_documents(docs(), tok), seq_len=48, pad_id=tok.eos_token_id)
    return PackedDataset(rows, micro_batch_size=4, seed=0)


def student(tiny_teacher_dir, **changes) -> StudentSide:
    side = StudentSide(
        vocab_size=len(AutoTokenizer.from_pretrained(tiny_teacher_dir)),
        tokenizer_hash=tokenizer_hash(tiny_teacher_dir),
        seq_len=48,
    )
    return dataclasses.replace(side, **changes)


@pytest.mark.parametrize("signal", ["top_k", "full"])
def test_in_process_feed_yields_the_served_feeds_tensors(teacher, dataset, tiny_teacher_dir, signal):
    distill = DistillSection(signal=signal, top_k=TOP_K if signal == "top_k" else DistillSection.top_k)
    batches = [dataset.batch(i) for i in range(N_BATCHES)]
    # prefetch 1: one request per engine call on the server, as in-process (same batch shapes)
    served_section = TeacherSection(targets=[teacher.address], prefetch=1, timeout_s=30)
    with closing(TeacherFeed(batches, served_section, distill, student(tiny_teacher_dir))) as feed:
        served = list(feed)
    in_process_section = TeacherSection(
        in_process=InProcessTeacherSection(model=str(tiny_teacher_dir), max_top_k=64)
    )
    with closing(InProcessTeacher(batches, in_process_section, distill, student(tiny_teacher_dir))) as feed:
        assert feed.depth == 0 and feed.info.backend == "hf" and feed.top_k == distill.top_k
        in_process = list(feed)

    assert [f.index for f in in_process] == [f.index for f in served] == list(range(N_BATCHES))
    for s, e in zip(served, in_process, strict=True):
        assert e.batch is s.batch  # the data order is untouched
        assert e.wait_ms > 0  # the teacher forward the step waited for
        assert s.teacher.valid.any() and torch.equal(e.teacher.valid, s.teacher.valid)
        for name in ("ids", "logprobs", "tail_logprob", "target_logprob", "full"):
            got, want = getattr(e.teacher, name), getattr(s.teacher, name)
            assert (got is None) == (want is None), name
            if want is not None:
                assert got.dtype == want.dtype and got.shape == want.shape, name
                assert torch.equal(got, want), name


def test_inprocess_teacher_is_refused_like_a_served_one(tiny_teacher_dir, tmp_path):
    distill = DistillSection(top_k=TOP_K)
    ok = student(tiny_teacher_dir)
    section = TeacherSection(in_process=str(tiny_teacher_dir))
    with pytest.raises(TeacherCompatError, match=r"teacher vocab_size \(logits width\) 512 != student"):
        InProcessTeacher([], section, distill, student(tiny_teacher_dir, vocab_size=600))
    with pytest.raises(TeacherCompatError, match="tokenizer hash"):
        InProcessTeacher([], section, distill, student(tiny_teacher_dir, tokenizer_hash="another"))
    with pytest.raises(TeacherCompatError, match=r"data\.seq_len=600 exceeds the teacher's max_seq_len=512"):
        InProcessTeacher([], section, distill, student(tiny_teacher_dir, seq_len=600))
    with pytest.raises(TeacherCompatError, match="exceeds the teacher's max_top_k=4"):
        bad_k = TeacherSection(in_process=InProcessTeacherSection(model=str(tiny_teacher_dir), max_top_k=4))
        InProcessTeacher([], bad_k, distill, ok)
    with pytest.raises(ValueError, match=r"max_batch_tokens=0 is out of range"):
        bad_flag = TeacherSection(
            in_process=InProcessTeacherSection(model=str(tiny_teacher_dir), max_batch_tokens=0)
        )
        InProcessTeacher([], bad_flag, distill, ok)
    with pytest.raises(ConfigError, match=r"teacher\.in_process: could not load"):
        InProcessTeacher([], TeacherSection(in_process=str(tmp_path / "nope")), distill, ok)


def train(tmp_path, name: str, student_dir, teacher: dict) -> list[dict]:
    """`asymkd train` (in this process, one rank) with a KD + CE loss; its per-step train records."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for _, d in docs()))
    out = tmp_path / name
    flags = ["--model.path", str(student_dir), "--data.paths", f"[{corpus}]", "--data.seq_len", "32"]
    flags += ["--optim.micro_batch_size", "2", "--optim.grad_accum_steps", "2", "--optim.lr", "3e-3"]
    flags += ["--distill.top_k", str(TOP_K), "--distill.ce_weight", "0.5", "--checkpoint.export", "false"]
    flags += ["--run.steps", str(STEPS), "--run.out_dir", str(out)]
    for key, value in teacher.items():
        flags += [f"--teacher.{key}", json.dumps(value)]
    assert train_main(flags) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def test_training_with_the_inprocess_teacher_gives_the_served_losses(
    teacher, tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    served = train(tmp_path, "served", tiny_student_dir, {"targets": [teacher.address], "prefetch": 2})
    in_process = train(
        tmp_path, "in_process", tiny_student_dir,
        {"in_process": {"model": str(tiny_teacher_dir), "dtype": "float32"}},
    )  # fmt: skip
    assert [r["step"] for r in in_process] == [r["step"] for r in served] == list(range(1, STEPS + 1))
    for s, e in zip(served, in_process, strict=True):
        assert e["sample_ids"] == s["sample_ids"]
        for key in ("loss", "kd", "ce", "teacher_mass"):
            assert e[key] == pytest.approx(s[key], rel=1e-5, abs=1e-6), (s["step"], key)
        assert e["prefetch"] == 0 and e["teacher_wait_ms"] > 0
