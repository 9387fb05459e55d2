"""`distill.loss: sampled_reverse_kl`: the policy-gradient loss of on-policy KD on sampled tokens.

Its gradient is −Σ A_t ∇log q(x_t) with A_t = log p_T(x_t) − log q(x_t); averaged over many tokens drawn from
the student it is the gradient of the exact reverse KL, and its value the reverse KL itself; masked rows count
for nothing; the teacher is asked for TARGET_ONLY (one value per token), and the config says which keys go
together.
"""

from __future__ import annotations

import pytest
import torch

from asymkd.config import ConfigError, load_config
from asymkd.contract import SequenceScores, Signal
from asymkd.v1 import teacher_pb2 as pb
from student_trainer.config import CacheWriteConfig, DistillSection, TrainConfig
from student_trainer.losses import reverse_kl, sampled_reverse_kl_sums
from student_trainer.sources.base import TeacherBatch
from student_trainer.sources.common import scatter_scores, wanted_signal
from student_trainer.sources.signals import build_query, score_params
from student_trainer.step import loss_sums

RKL = {"signal": "target_only", "loss": "sampled_reverse_kl"}


def _rows(n=7, v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2, -1)
    targets = torch.randint(0, v, (n,), generator=g)
    return logits, teacher, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_is_the_policy_gradient_of_reverse_kl_on_the_sampled_tokens(temperature):
    logits, teacher, x = _rows()
    mask = torch.ones(len(x), dtype=torch.bool)
    z = logits.clone().requires_grad_()
    lp_x = teacher.gather(-1, x[:, None])[:, 0]
    kd, ce, n = sampled_reverse_kl_sums(z, lp_x, x, mask, temperature=temperature)
    kd.backward()
    q = torch.softmax(logits / temperature, -1)
    lq_x = q.log().gather(-1, x[:, None])[:, 0]
    advantage = lp_x - lq_x
    onehot = torch.nn.functional.one_hot(x, logits.shape[-1]).double()
    # ∇_z log q(x) = (onehot(x) − q) / T; the loss is −A · log q, times T²
    expected = -advantage[:, None] * (onehot - q) / temperature * temperature**2
    torch.testing.assert_close(z.grad, expected)
    # reported: the estimate Σ (log q − log p) (× T²), not the surrogate's value
    torch.testing.assert_close(kd.detach(), (lq_x - lp_x).sum() * temperature**2)
    torch.testing.assert_close(ce, -torch.log_softmax(logits, -1).gather(-1, x[:, None]).sum())
    assert n == len(x)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mean_over_student_samples_is_the_exact_reverse_kl_and_its_gradient(temperature):
    v, n = 5, 40_000
    g = torch.Generator().manual_seed(1234)
    z = (torch.randn(v, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    p_t = torch.log_softmax(torch.randn(v, generator=g, dtype=torch.float64) * 1.5, -1)  # teacher at T
    lq_t = torch.log_softmax(z / temperature, -1)
    exact = temperature**2 * reverse_kl(p_t, lq_t)
    (exact_grad,) = torch.autograd.grad(exact, z)

    x = torch.multinomial(lq_t.detach().exp(), n, replacement=True, generator=g)  # on-policy: x ~ Q_T
    kd, _, _ = sampled_reverse_kl_sums(
        z.expand(n, v), p_t[x], x, torch.ones(n, dtype=torch.bool), temperature=temperature
    )
    (grad,) = torch.autograd.grad(kd / n, z)

    # per-sample values and gradients, for a standard error (the test is statistical, with a fixed seed)
    q = lq_t.detach().exp()
    per_value = temperature**2 * (lq_t.detach()[x] - p_t[x])
    per_grad = (
        -(p_t[x] - lq_t.detach()[x])[:, None] * (torch.eye(v, dtype=torch.float64)[x] - q) * temperature
    )
    se_value, se_grad = per_value.std() / n**0.5, per_grad.std(0) / n**0.5
    assert abs(float(kd.detach()) / n - float(exact.detach())) < 4 * float(se_value)
    assert bool(((grad - exact_grad).abs() < 4 * se_grad + 1e-12).all()), (grad, exact_grad, se_grad)
    torch.testing.assert_close(grad, per_grad.mean(0))  # the loss's gradient is the per-sample mean
    assert float(exact_grad.abs().max()) > 10 * float(se_grad.max())  # the check can fail: a real signal


def test_masked_rows_count_for_nothing():
    logits, teacher, x = _rows(n=9)
    lp_x = teacher.gather(-1, x[:, None])[:, 0]
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    z = logits.clone().requires_grad_()
    kd, ce, n = sampled_reverse_kl_sums(z, lp_x, x, mask)
    (kd + ce).backward()
    assert n == 5 and bool((z.grad[~mask] == 0).all()) and bool((z.grad[mask] != 0).any())
    # whatever the masked rows hold (a placeholder, a NaN, another target) changes nothing
    lp_junk, x_junk = lp_x.clone(), x.clone()
    lp_junk[~mask], x_junk[~mask] = float("nan"), 0
    kd2, ce2, _ = sampled_reverse_kl_sums(logits, lp_junk, x_junk, mask)
    torch.testing.assert_close((kd2, ce2), (kd.detach(), ce.detach()))
    sub = sampled_reverse_kl_sums(logits[mask], lp_x[mask], x[mask], torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(sub[0], kd.detach())
    with pytest.raises(ValueError, match="the student has 9 rows"):
        sampled_reverse_kl_sums(logits, lp_x[:4], x, mask)


def test_trainer_step_uses_the_teacher_target_logprob_and_weights_the_terms():
    b, t, v = 2, 6, 13
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(b, t, v, generator=g).requires_grad_()
    input_ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t - 1, dtype=torch.bool)
    mask[0, :2] = False  # a prompt
    lp = torch.log_softmax(torch.randn(b, t - 1, v, generator=g), -1).gather(-1, input_ids[:, 1:, None])[
        ..., 0
    ]
    teacher = TeacherBatch(valid=mask.clone(), target_logprob=lp)
    distill = DistillSection(**RKL, kd_weight=1.0, ce_weight=0.5)
    sums = loss_sums(logits, input_ids, mask, teacher, distill)
    kd, ce, _ = sampled_reverse_kl_sums(logits[:, :-1], lp, input_ids[:, 1:], mask)
    torch.testing.assert_close(sums.kd, kd)
    torch.testing.assert_close(sums.ce, ce)
    torch.testing.assert_close(sums.loss, kd + 0.5 * ce)
    assert sums.teacher_mass is None and sums.student_mass is None
    with pytest.raises(ValueError, match="needs the teacher's target_logprob"):
        loss_sums(logits, input_ids, mask, TeacherBatch(valid=mask), distill)


def test_the_teacher_is_asked_for_target_only_and_its_answer_fills_target_logprob():
    distill = DistillSection(**RKL)
    assert wanted_signal(distill) == Signal.TARGET_ONLY
    loss_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    batch = {"input_ids": torch.arange(10).view(2, 5), "loss_mask": loss_mask}
    proto = build_query(batch, distill, distill.top_k).to_proto()
    assert proto.signal == pb.TARGET_ONLY and proto.top_k == 0 and proto.num_samples == 0
    assert [s.score_from for s in proto.sequences] == [1, 0]
    params = score_params(distill, distill.top_k)
    assert params.signal == Signal.TARGET_ONLY and params.top_k == 0
    answers = [SequenceScores(target_logprob=torch.tensor([-1.0, -2.0, -3.0])), SequenceScores(
        target_logprob=torch.tensor([-4.0, -5.0, -6.0, -7.0]))]  # fmt: skip
    tb = scatter_scores(answers, loss_mask, top_k=distill.top_k, vocab_size=32)
    assert tb.ids is None and tb.logprobs is None and tb.full is None
    assert tb.valid.tolist() == loss_mask.tolist()
    assert tb.target_logprob.tolist() == [[0.0, -1.0, -2.0, -3.0], [-4.0, -5.0, -6.0, -7.0]]


BASE = ["--model.tokenizer", "/tok", "--data.builtin", "stdlib-docs"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (
            ["--distill.loss", "sampled_reverse_kl"],
            "loss='sampled_reverse_kl' with signal='top_k': use signal",
        ),
        (["--distill.signal", "target_only"], "loss='forward_kl' with signal='target_only': use signal"),
        (["--distill.signal", "full", "--distill.loss", "sampled_reverse_kl"], "signal='full'"),
    ],
)
def test_config_asks_for_signal_target_only_with_the_loss(flags, needle):
    with pytest.raises(ConfigError, match="distill") as err:
        load_config(TrainConfig, None, [*BASE, *flags])
    assert needle in str(err.value)


def test_config_accepts_the_pair_and_the_cache_writer_refuses_it():
    flags = [*BASE, "--distill.signal", "target_only", "--distill.loss", "sampled_reverse_kl"]
    cfg = load_config(TrainConfig, None, flags)
    assert (cfg.distill.signal, cfg.distill.loss) == ("target_only", "sampled_reverse_kl")
    with pytest.raises(ConfigError, match=r"distill\.signal='target_only': a cache holds top_k or sampled"):
        load_config(CacheWriteConfig, None, [*flags, "--teacher.targets", "[a:1]", "--out", "/c"])
