"""The trainer-side signals against independent float64 references: HIDDEN + the teacher's output layer = FULL
(every loss, T != 1, logit extras, padded vocabularies), the fused dense kernel's values and gradients, RS-KD's
unbiasedness (fixed seeds), AT_IDS + tail = the dense divergence on the collapsed distribution.
"""

from __future__ import annotations

import math

import pytest
import torch

from asymkd.contract import Signal
from student_trainer.config import DistillSection
from student_trainer.losses import LOSS_NAMES, distill_loss, divergence
from student_trainer.sources.base import TeacherBatch
from student_trainer.sparse_kd import sampled_targets
from student_trainer.step import loss_sums, student_top_ids
from student_trainer.teacher_head import TeacherHead
from teacher_server import scoring
from teacher_server.backends.base import ScoreItem, ScoreParams

BETA, ALPHA = 0.3, 0.2
N, H, V = 10, 16, 40


def case(seed: int = 0, v_s: int = V, v_t: int = V, scale: float = 1.0, softcap: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    head = TeacherHead(
        torch.randn(v_t, H, generator=g) * 0.6, torch.randn(v_t, generator=g) * 0.1, scale, softcap
    )
    hidden = torch.randn(N, H, generator=g)
    student = (torch.randn(N, v_s, generator=g) * 1.5).double().requires_grad_()
    mask = torch.ones(N, dtype=torch.bool)
    mask[[0, 3]] = False
    targets = torch.randint(0, min(v_s, v_t), (N,), generator=g)
    return head, hidden, student, mask, targets


def teacher_logits64(head: TeacherHead, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer in float64, written out (no TeacherHead code)."""
    z = hidden.double() @ head.weight.double().T + head.bias.double()
    z = z * head.scale
    return torch.tanh(z / head.softcap) * head.softcap if head.softcap else z


def reference(teacher_logits: torch.Tensor, student: torch.Tensor, mask, loss: str, t: float) -> torch.Tensor:
    """Σ over masked rows of D(softmax(teacher/T) ‖ softmax(student/T)) × T², float64, teacher padded with -inf."""
    v_s = student.shape[1]
    lp = torch.log_softmax(teacher_logits[:, :v_s] / t, -1)
    lp = torch.nn.functional.pad(lp, (0, v_s - lp.shape[1]), value=-math.inf)
    lq = torch.log_softmax(student / t, -1)
    return divergence(lp[mask], lq[mask], loss, beta=BETA, alpha=ALPHA).sum() * t * t


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_hidden_with_the_output_layer_reproduces_full(loss, temperature):
    head, hidden, student, mask, targets = case(seed=1, scale=0.8, softcap=4.0)
    full = torch.log_softmax(head.logits(hidden) / temperature, -1)  # what the server sends as FULL
    kw = dict(targets=targets, loss=loss, beta=BETA, alpha=ALPHA, temperature=temperature, chunk_rows=3)
    s32 = student.detach().float().requires_grad_()
    via_full = distill_loss(s32, full, mask, **kw)
    via_hidden = distill_loss(s32, hidden, mask, teacher_head=head, **kw)
    assert abs(via_full.kd_sum.item() - via_hidden.kd_sum.item()) <= 1e-5 * max(
        1.0, abs(via_full.kd_sum.item())
    )
    g_full = torch.autograd.grad(via_full.kd_sum + via_full.ce_sum, s32)[0]
    g_hidden = torch.autograd.grad(via_hidden.kd_sum + via_hidden.ce_sum, s32)[0]
    torch.testing.assert_close(g_hidden, g_full, atol=1e-5, rtol=1e-5)
    ref = reference(teacher_logits64(head, hidden), student.detach(), mask, loss, temperature)
    assert via_hidden.kd_sum.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize(("v_s", "v_t"), [(V, V), (V + 6, V), (V, V + 5)])
def test_dense_kernel_values_and_gradients_against_float64(loss, v_s, v_t):
    head, hidden, student, mask, targets = case(seed=2, v_s=v_s, v_t=v_t)
    t = 1.7
    out = distill_loss(
        student, hidden.double(), mask, teacher_head=head, targets=targets, loss=loss, beta=BETA, alpha=ALPHA,
        temperature=t, chunk_rows=4,
    )  # fmt: skip
    leaf = student.detach().clone().requires_grad_()
    ref_kd = reference(teacher_logits64(head, hidden), leaf, mask, loss, t)
    ref_ce = torch.nn.functional.cross_entropy(leaf[mask], targets[mask], reduction="sum")
    if math.isinf(ref_kd.item()):  # reverse KL with student mass where the teacher has none: truly +inf
        assert out.kd_sum.item() == math.inf and loss == "reverse_kl" and v_s > v_t
        return
    assert out.kd_sum.item() == pytest.approx(ref_kd.item(), rel=1e-5, abs=1e-6)  # fp32 head, fp64 student
    assert out.ce_sum.item() == pytest.approx(ref_ce.item(), rel=1e-10)
    w_kd, w_ce = 0.7, 0.4
    (g,) = torch.autograd.grad(w_kd * out.kd_sum + w_ce * out.ce_sum, student)
    (g_ref,) = torch.autograd.grad(w_kd * ref_kd + w_ce * ref_ce, leaf)
    torch.testing.assert_close(g, g_ref, atol=2e-6, rtol=1e-4)
    assert torch.all(g[~mask] == 0)


def test_dense_kernel_supports_retain_graph_and_no_grad():
    head, hidden, student, mask, targets = case(seed=3)
    out = distill_loss(student, hidden, mask, teacher_head=head, targets=targets)
    (g_kd,) = torch.autograd.grad(out.kd_sum, student, retain_graph=True)
    (g_ce,) = torch.autograd.grad(out.ce_sum, student)
    assert torch.any(g_kd != 0) and not torch.allclose(g_kd, g_ce)
    with torch.no_grad():
        again = distill_loss(student, hidden, mask, teacher_head=head, targets=targets)
    assert again.kd_sum.item() == pytest.approx(out.kd_sum.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------- RS-KD
def test_rs_kd_estimator_is_unbiased_for_forward_kl():
    """Many independent draws (the server's sample_counts) of one teacher row: the mean gradient and the mean
    KD value converge to forward KL's own, within 5 standard errors (fixed seeds: deterministic)."""
    g = torch.Generator().manual_seed(7)
    v, draws, m, t = 12, 4000, 12, 1.5
    t_logits, s_logits = torch.randn(v, generator=g) * 2, torch.randn(v, generator=g)
    lp = torch.log_softmax(t_logits.double() / t, -1)
    ids, counts = scoring.sample_counts(lp.float().expand(draws, v), m, torch.Generator().manual_seed(11))
    t_lp_at = lp.float().expand(draws, v).gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, -math.inf)
    teacher = TeacherBatch(valid=torch.ones(1, draws, dtype=torch.bool), ids=ids[None], counts=counts[None],
                           logprobs=t_lp_at[None])  # fmt: skip
    logits = s_logits.double().expand(1, draws + 1, v).clone().requires_grad_()
    input_ids = torch.zeros(1, draws + 1, dtype=torch.long)
    distill = DistillSection(signal="sampled", num_samples=m, temperature=t)
    sums = loss_sums(logits, input_ids, teacher.valid, teacher, distill)
    (grad,) = torch.autograd.grad(sums.kd, logits)
    per_row = grad[0, :draws]  # each row's gradient from its own draws
    lq = torch.log_softmax(s_logits.double() / t, -1)
    want = t * (lq.exp() - lp.exp())  # ∂/∂logits of T²·KL(p‖softmax(logits/T))
    se = per_row.std(0) / math.sqrt(draws)
    assert torch.all((per_row.mean(0) - want).abs() <= 5 * se + 1e-9)
    kl = (lp.exp() * (lp - lq)).sum() * t * t
    per_row_kd = t * t * ((counts / m) * (t_lp_at.double() - lq[ids.clamp(min=0)])).nan_to_num(0.0).sum(-1)
    kd_se = per_row_kd.std() / math.sqrt(draws)
    assert abs(sums.kd.item() / draws - kl.item()) <= 5 * kd_se.item()
    assert per_row.std(0).max() > 1e-3  # the draws do differ: the test could fail


def test_sampled_targets_fill_padding_with_distinct_undrawn_ids():
    ids = torch.tensor([[0, 3, 5, -1, -1], [1, 2, 3, 4, -1], [7, -1, -1, -1, -1]])
    counts = torch.tensor([[2, 1, 2, 0, 0], [1, 1, 2, 1, 0], [5, 0, 0, 0, 0]])
    filled, log_w = sampled_targets(ids, counts, vocab_size=100)
    for row, drawn in zip(filled.tolist(), ids.tolist(), strict=True):
        assert len(set(row)) == len(row) and all(a == b for a, b in zip(row, drawn, strict=False) if b >= 0)
    torch.testing.assert_close(log_w.exp().sum(-1), torch.ones(3))
    assert torch.isneginf(log_w[counts == 0]).all()


def test_sampled_rejects_losses_it_cannot_estimate():
    with pytest.raises(ValueError, match="forward KL only"):
        DistillSection(signal="sampled", loss="reverse_kl")
    DistillSection(signal="sampled", loss="jsd", beta=0.0)


# ------------------------------------------------------------------------------------------------ AT_IDS
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_at_ids_with_tail_equals_the_dense_divergence_on_the_collapsed_distribution(loss, temperature):
    g = torch.Generator().manual_seed(5)
    b, t_len, m = 2, 6, 5
    t_logits = torch.randn(b, t_len, V, generator=g) * 2
    logits = torch.randn(b, t_len, V, generator=g, dtype=torch.float64).requires_grad_()
    ids = student_top_ids(logits, m)  # the student's own ids, (B, T-1, m)
    item = ScoreItem(torch.zeros(t_len, dtype=torch.long), at_ids=None)
    answers = []
    for i in range(b):  # the server's AT_IDS computation
        item.at_ids = ids[i]
        params = ScoreParams(signal=Signal.AT_IDS, temperature=temperature)
        answers.append(scoring.scores_from_logits(t_logits[i, :-1], item, params))
    teacher = TeacherBatch(
        valid=torch.ones(b, t_len - 1, dtype=torch.bool), ids=ids,
        logprobs=torch.stack([a.logprobs for a in answers]), tail_logprob=torch.stack([a.tail_logprob for a in answers]),
    )  # fmt: skip
    distill = DistillSection(
        signal="at_ids", top_k=m, loss=loss, beta=BETA, alpha=ALPHA, temperature=temperature
    )
    input_ids = torch.zeros(b, t_len, dtype=torch.long)
    kd = loss_sums(logits, input_ids, teacher.valid, teacher, distill).kd

    def collapse(lp: torch.Tensor) -> torch.Tensor:  # (R, V) -> (R, m+1): the ids, then everything else
        at = lp.gather(-1, ids.reshape(-1, m))
        rest = lp.scatter(-1, ids.reshape(-1, m), -math.inf).logsumexp(-1, keepdim=True)
        return torch.cat([at, rest], -1)

    lp = torch.log_softmax(t_logits[:, :-1].double() / temperature, -1).reshape(-1, V)
    lq = torch.log_softmax(logits[:, :-1] / temperature, -1).reshape(-1, V)
    ref = divergence(collapse(lp), collapse(lq), loss, beta=BETA, alpha=ALPHA).sum() * temperature**2
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    g_kd = torch.autograd.grad(kd, logits, retain_graph=True)[0]
    g_ref = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g_kd, g_ref, atol=1e-6, rtol=1e-5)


def test_data_plane_rows_become_the_batch_without_a_copy():
    """A data-plane tensor (one per request) split by sequence is laid out as (B, T-1, V) by a view when every
    row is scored from row 0; otherwise (a prompt row) by copies with the placeholder rows. Same values."""
    from asymkd.contract import SequenceScores
    from student_trainer.sources.common import scatter_scores

    b, rows, v = 3, 5, 7
    whole = torch.log_softmax(torch.randn(b * rows, v), -1)
    parts = [SequenceScores(full=p, target_logprob=torch.zeros(rows)) for p in whole.split(rows)]
    tb = scatter_scores(parts, torch.ones(b, rows, dtype=torch.bool), top_k=64, vocab_size=v)
    assert tb.full.data_ptr() == whole.data_ptr() and torch.equal(tb.full, whole.view(b, rows, v))
    mask = torch.ones(b, rows, dtype=torch.bool)
    mask[1, :2] = False  # row 1 is scored from row 2
    parts[1] = SequenceScores(full=whole[rows + 2 : 2 * rows].clone(), target_logprob=torch.zeros(rows - 2))
    tb = scatter_scores(parts, mask, top_k=64, vocab_size=v)
    assert tb.full.data_ptr() != whole.data_ptr() and torch.equal(tb.full[1, 2:], whole[rows + 2 : 2 * rows])
    assert torch.equal(tb.valid, mask) and torch.isneginf(tb.full[1, :2, 1:]).all()
