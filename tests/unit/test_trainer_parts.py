"""Trainer parts in one process: LR schedule, loss alignment, token normalization over accumulation, logging."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student_trainer.config import DistillSection
from student_trainer.observability import format_duration, format_step_line, format_summary
from student_trainer.parallel import clip_grad_norm
from student_trainer.sources.base import MicroBatch, TeacherBatch
from student_trainer.step import accumulate_gradients, loss_sums, lr_multiplier


def test_lr_schedule_warmup_cosine_constant():
    f = dict(warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, **f) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, **f) == 1.0  # first step after warmup: the peak
    assert lr_multiplier(9, **f) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(14, **f) == pytest.approx(0.1) and lr_multiplier(99, **f) == pytest.approx(0.1)
    values = [lr_multiplier(s, **f) for s in range(4, 15)]
    assert values == sorted(values, reverse=True)
    assert lr_multiplier(10, **{**f, "schedule": "constant"}) == 1.0
    assert lr_multiplier(0, **{**f, "warmup_steps": 0}) == 1.0


@pytest.fixture(scope="module")
def tiny_model(tiny_student_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32).train()


def _batch(seed: int = 0, b: int = 4, t: int = 12, v: int = 512) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t - 1, generator=g) > 0.3  # ragged: a different token count per row
    mask[0, :5] = False  # a "prompt"
    mask[1] = False  # a row without targets
    return {
        "input_ids": torch.randint(0, v, (b, t), generator=g),
        "loss_mask": mask,
        "sample_ids": torch.arange(b),
    }


def _teacher(batch: dict, v: int = 512, k: int = 8, seed: int = 1) -> TeacherBatch:
    """An exact top-k teacher (from random logits) with an exact tail bucket; a few rows not scored."""
    b, t = batch["input_ids"].shape
    lp = torch.log_softmax(torch.randn(b, t - 1, v, generator=torch.Generator().manual_seed(seed)) * 3, -1)
    top, ids = lp.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    valid = torch.ones(b, t - 1, dtype=torch.bool)
    valid[2, :3] = False
    return TeacherBatch(valid=valid, ids=ids, logprobs=top, tail_logprob=tail, target_logprob=None)


def _split(batch: dict, teacher: TeacherBatch | None, at: int) -> list[MicroBatch]:
    def part(sl):
        tb = None
        if teacher is not None:
            tb = TeacherBatch(
                valid=teacher.valid[sl],
                ids=teacher.ids[sl],
                logprobs=teacher.logprobs[sl],
                tail_logprob=teacher.tail_logprob[sl],
            )
        return MicroBatch({k: v[sl] for k, v in batch.items()}, tb)

    return [part(slice(0, at)), part(slice(at, None))]


def _grads(model, micro, distill) -> tuple[list[torch.Tensor], torch.Tensor, float]:
    model.zero_grad(set_to_none=True)
    sums, n = accumulate_gradients(model, micro, distill=distill, device=torch.device("cpu"))
    return [p.grad.clone() for p in model.parameters()], sums, n


@pytest.mark.parametrize("with_teacher", [False, True])
def test_accumulation_equals_the_big_batch_gradient(tiny_model, with_teacher):
    batch = _batch()
    teacher = _teacher(batch) if with_teacher else None
    distill = DistillSection(kd_weight=1.0, ce_weight=0.5, chunk_rows=7)
    big, big_sums, big_n = _grads(tiny_model, [MicroBatch(batch, teacher)], distill)
    acc, acc_sums, acc_n = _grads(tiny_model, _split(batch, teacher, 1), distill)  # 1 row + 3 rows
    assert big_n == acc_n == float((batch["loss_mask"] & (True if teacher is None else teacher.valid)).sum())
    assert torch.allclose(big_sums, acc_sums, atol=1e-9, rtol=1e-6, equal_nan=True)
    for g_big, g_acc in zip(big, acc, strict=True):
        torch.testing.assert_close(g_acc, g_big, atol=1e-7, rtol=1e-5)
    # and it is the gradient of the plain mean over all target tokens
    if not with_teacher:
        tiny_model.zero_grad(set_to_none=True)
        logits = tiny_model(input_ids=batch["input_ids"]).logits[:, :-1]
        m = batch["loss_mask"]
        F.cross_entropy(logits[m], batch["input_ids"][:, 1:][m]).backward()
        for g_big, p in zip(big, tiny_model.parameters(), strict=True):
            torch.testing.assert_close(g_big, p.grad, atol=1e-7, rtol=1e-5)


def test_loss_rows_align_with_next_tokens(tiny_model):
    batch = _batch(seed=3)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits
    ce_only = loss_sums(logits, ids, mask, None, DistillSection())
    ref = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask], reduction="sum")
    assert ce_only.kd is None and torch.allclose(ce_only.ce, ref) and torch.equal(ce_only.loss, ce_only.ce)
    # a teacher equal to the student on every row (k = V, empty tail): KD is 0 only if rows line up
    lp = torch.log_softmax(logits[:, :-1], -1)
    top, top_ids = lp.topk(lp.shape[-1], -1)
    tail = torch.full(mask.shape, -math.inf)
    same = TeacherBatch(valid=torch.ones_like(mask), ids=top_ids, logprobs=top, tail_logprob=tail)
    kd_run = loss_sums(logits, ids, mask, same, DistillSection(chunk_rows=5))
    kd = kd_run.kd
    assert abs(float(kd)) < 1e-4 and torch.allclose(kd_run.ce, ref)
    n = int(mask.sum())  # k = V: all of both distributions lies inside the teacher's "top-k"
    assert float(kd_run.teacher_mass) == pytest.approx(n, rel=1e-5)
    assert float(kd_run.student_mass) == pytest.approx(n, rel=1e-5)
    shifted = TeacherBatch(
        valid=same.valid, ids=top_ids.roll(1, 1), logprobs=top.roll(1, 1), tail_logprob=tail
    )
    assert float(loss_sums(logits, ids, mask, shifted, DistillSection()).kd) > 100 * max(abs(float(kd)), 1e-6)


def test_clip_grad_norm_reports_and_clips(tiny_model):
    tiny_model.zero_grad(set_to_none=True)
    for p in tiny_model.parameters():
        p.grad = torch.full_like(p, 1.0)
    n = sum(p.numel() for p in tiny_model.parameters())
    assert clip_grad_norm(tiny_model, 0.0) == pytest.approx(math.sqrt(n), rel=1e-5)
    clip_grad_norm(tiny_model, 1.0)
    total = torch.sqrt(sum((p.grad**2).sum() for p in tiny_model.parameters()))
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    tiny_model.zero_grad(set_to_none=True)


def test_progress_line():
    m = {
        "loss": 3.21,
        "kd": 2.9,
        "ce": 3.5,
        "lr": 3e-4,
        "gnorm": 1.23,
        "tok_per_s": 4321.0,
        "teacher_wait_ms": 3.2,
        "prefetch": 4,
        "mem_gb": 1.2,
    }
    line = format_step_line(12, 300, m, eta_s=130, elapsed_s=65)
    assert line == (
        "+1m05s step 12/300 | train loss 3.2100 (kd 2.9000, ce 3.5000) | lr 3.0e-04 | gnorm 1.23 | "
        "tok/s 4,321 | teacher wait 3 ms, 4 ready | mem 1.2 GB | eta 2m10s"
    )
    ce_only = format_step_line(1, 2, {**m, "kd": None, "teacher_wait_ms": None}, 0)
    assert "train loss 3.2100 (ce 3.5000)" in ce_only and "kd" not in ce_only and "teacher" not in ce_only
    assert format_duration(3725) == "1h02m" and format_duration(7) == "7s"
    summary = {"step": 300, "train_s": 200.0, "samples_per_s": 6.0, "loss": 2.9, "eval_loss": 6.12}
    assert format_summary(summary | {"export": "runs/x/final"}) == (
        "done: 300 steps in 3m20s (6.0 samples/s) | final train loss 2.9000 | held-out CE 6.1200 | "
        "export runs/x/final"
    )
