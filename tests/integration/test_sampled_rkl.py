"""`distill.loss: sampled_reverse_kl` under real torchrun (2 ranks, gloo) against a real teacher server.

The teacher answers TARGET_ONLY (one log-prob per target token). The student starts as the tiny random
Llama; the teacher is the same model made peaked (its output layer × 8), so the two differ by how sharp
they are; the reported KD is mean (log q − log p) over the target tokens.
- Off-policy, on the dataset's tokens: it starts well above 0 and falls (the gradient pulls each log q(x_t)
  toward the teacher's log p(x_t)).
- On-policy (`distill.lmbda: 1`), on completions the student samples itself: it is an unbiased estimate of
  the reverse KL on those samples (checked against the exact KL; the policy gradient's learning on a
  handful of samples per step is too noisy for a 20-step test, its expectation is in the unit tests).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from teacher_server.launch import LocalTeacher
from tests.integration.test_kd_torchrun import write_corpus

STEPS, WORLD, MICRO = 20, 2, 2
SHARPEN = 8.0


@pytest.fixture(scope="module")
def peaked_teacher(tiny_teacher_dir, tmp_path_factory):
    """A real hf server of the tiny Llama with its output layer × 8 (a sharper distribution)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("peaked_teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(out)
    args = ["--model", str(out), "--backend", "hf"]
    with LocalTeacher(args, log_path=out / "teacher.log", env={"OMP_NUM_THREADS": "1"}) as t:
        t.model_dir = out
        yield t


def train(tmp_path, teacher, student_dir, data: dict, distill: dict, lr: float = 1e-2) -> list[dict]:
    """`asymkd train` under torchrun with sampled_reverse_kl; returns the train records."""
    config = {
        "model": {"path": str(student_dir)},
        "data": data,
        "optim": {"lr": lr, "micro_batch_size": MICRO, "schedule": "constant"},
        "distill": {"signal": "target_only", "loss": "sampled_reverse_kl", **distill},
        "teacher": {"targets": [teacher.address], "timeout_s": 30},
        "checkpoint": {"export": False},
        "run": {"steps": STEPS, "out_dir": str(tmp_path / "run"), "seed": 0},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd += ["-m", "asymkd.cli", "train", "--config", str(tmp_path / "train.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASYMKD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "signal target_only" in log  # the feed asked the server for TARGET_ONLY
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[0]["loss"] == pytest.approx(steps[0]["kd"])  # kd_weight 1, ce_weight 0: the value is KD
    return steps


@pytest.mark.slow
def test_off_policy_on_dataset_tokens_lowers_the_reported_kd(tmp_path, peaked_teacher, tiny_teacher_dir):
    write_corpus(tmp_path / "corpus.jsonl")
    data = {"paths": [str(tmp_path / "corpus.jsonl")], "seq_len": 32}
    kd = [r["kd"] for r in train(tmp_path, peaked_teacher, tiny_teacher_dir, data, {})]
    assert kd[0] > 0.5, kd  # the sharper teacher gives the corpus's tokens less mass than the student
    assert sum(kd[-4:]) < 0.75 * sum(kd[:4]), kd


def write_prompts(path) -> None:
    import argparse
    import logging

    docs = [inspect.getdoc(obj) for mod in (argparse, logging) for obj in vars(mod).values()]
    docs = [d for d in docs if d and len(d) > 80 and "\n" in d]
    recs = [dict(zip(("prompt", "completion"), d.split("\n", 1), strict=True)) for d in docs]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def on_policy_reverse_kl(student_dir, teacher_dir, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Per completion token, the exact KL(student ‖ teacher) over the vocabulary, on completions the student
    samples (4 per prompt) from `prompts`: what the run's KD estimates, without its sampling noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.rollout import build_batch, sample_completions

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    q_model, p_model = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (student_dir, teacher_dir))
    prompts = [p for p in prompts for _ in range(4)]
    new = sample_completions(
        q_model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    batch = build_batch(prompts, new, pad_id=tok.pad_token_id, sample_ids=torch.arange(len(prompts)))
    with torch.no_grad():
        lq, lp = (
            torch.log_softmax(m(batch["input_ids"]).logits[:, :-1].double(), -1) for m in (q_model, p_model)
        )
    return float((lq.exp() * (lq - lp)).sum(-1)[batch["loss_mask"]].mean())


@pytest.mark.slow
def test_on_policy_kd_is_the_reverse_kl_of_the_student_samples(tmp_path, peaked_teacher, tiny_teacher_dir):
    """lmbda=1: the student samples every completion, the teacher scores them (TARGET_ONLY), and the reported
    KD is an unbiased estimate of the reverse KL on the student's own samples. The learning rate is ~0, so
    the student stays the model the test computes that KL with: rows misaligned with the teacher's answer,
    tokens the student did not sample, or a wrong sign would each move the estimate far from it."""
    from transformers import AutoTokenizer

    from student_trainer.config import DataSection
    from student_trainer.data import load_prompt_documents
    from student_trainer.rollout import PromptDataset

    write_prompts(tmp_path / "prompts.jsonl")
    data = {"paths": [str(tmp_path / "prompts.jsonl")], "format": "prompt_completion", "seq_len": 48}
    steps = train(
        tmp_path, peaked_teacher, tiny_teacher_dir, data, {"lmbda": 1.0, "max_new_tokens": 16}, lr=1e-9
    )
    assert all(p == "student" for r in steps for p in r["sample_policy"])  # every completion sampled
    estimate = sum(r["kd"] * r["tokens"] for r in steps) / sum(r["tokens"] for r in steps)

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    docs = load_prompt_documents(DataSection(**data), tok)
    ds = PromptDataset(docs, micro_batch_size=MICRO, seq_len=48, max_new_tokens=16, eos_id=tok.eos_token_id)
    used = [ds.prompts[i % len(ds)] for r in steps for i in r["sample_ids"]]  # the prompts the run sampled
    exact = on_policy_reverse_kl(tiny_teacher_dir, peaked_teacher.model_dir, used, 16)
    assert exact > 0.3  # the sharper teacher is far enough for a wrong estimate to show
    assert abs(estimate - exact) < 0.15 * exact, (estimate, exact)
