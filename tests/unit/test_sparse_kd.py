"""The fused top-k + tail kernel (student_trainer/sparse_kd.py): its analytic backward against numerical
gradients and against plain autograd over an independent K+1-class formulation; exact tiny tails; memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from student_trainer.losses import LOSS_NAMES, distill_loss, divergence

N, V, K = 7, 13, 4


def make_case(seed: int = 0, dtype=torch.float64, v: int = V, k: int = K, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(N, v, generator=g, dtype=dtype)).requires_grad_()
    teacher = torch.log_softmax(2 * torch.randn(N, v, generator=g, dtype=torch.float64), -1)
    t_lp, ids = teacher.topk(k, -1)
    tail = torch.log1p(-t_lp.exp().sum(-1).clamp(max=1.0))
    mask = torch.tensor([True, False, True, True, False, True, True])
    targets = torch.randint(0, v, (N,), generator=g)
    return student, ids, t_lp, tail, mask, targets


def reference(student, ids, t_lp, tail, mask, targets, *, loss, temperature, beta=0.3, alpha=0.2):
    """Plain autograd, written independently: K+1 classes from a full log-softmax and a masked logsumexp.
    Returns (kd_sum, ce_sum)."""
    z = student.double()[mask] / temperature
    ids, t_lp, tail = ids[mask], t_lp[mask].double(), tail[mask].double()
    lq_all = torch.log_softmax(z, -1)
    in_top = torch.zeros_like(z, dtype=torch.bool).scatter(-1, ids, True)
    lq_tail = torch.logsumexp(z.masked_fill(in_top, float("-inf")), -1) - torch.logsumexp(z, -1)
    lq = torch.cat([lq_all.gather(-1, ids), lq_tail[:, None]], -1)
    lp = torch.cat([t_lp, tail[:, None]], -1)
    kd = divergence(lp, lq, loss, beta=beta, alpha=alpha).sum() * temperature**2
    ce = F.cross_entropy(student.double()[mask], targets[mask], reduction="sum")
    return kd, ce


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize(
    ("temperature", "kd_weight", "ce_weight"), [(1.0, 1.0, 0.0), (1.0, 1.0, 0.3), (2.0, 0.5, 0.5)]
)
def test_gradient_equals_plain_autograd(loss, temperature, kd_weight, ce_weight):
    """The trainer's mix kd_weight·KD + ce_weight·CE of the two sums, value and gradient."""
    student, ids, t_lp, tail, mask, targets = make_case()
    kw = {"loss": loss, "beta": 0.3, "alpha": 0.2, "temperature": temperature}
    out = distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, targets=targets, **kw)
    kd, ce = reference(student, ids, t_lp, tail, mask, targets, **kw)
    assert out.kd_sum.item() == pytest.approx(kd.item(), rel=1e-10, abs=1e-12)
    assert out.ce_sum.item() == pytest.approx(ce.item(), rel=1e-10)
    (grad,) = torch.autograd.grad(kd_weight * out.kd_sum + ce_weight * out.ce_sum, student)
    (grad_ref,) = torch.autograd.grad(kd_weight * kd + ce_weight * ce, student)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_gradcheck_numerical(loss):
    student, ids, t_lp, tail, mask, targets = make_case(seed=1)

    def f(s):
        kw = {"teacher_ids": ids, "teacher_tail": tail, "targets": targets}
        out = distill_loss(s, t_lp, mask, loss=loss, temperature=1.5, **kw)
        return 0.75 * out.kd_sum + 0.25 * out.ce_sum

    assert torch.autograd.gradcheck(f, (student,), eps=1e-6, atol=1e-6)


def test_tiny_tail_is_exact_in_fp32():
    """Student top-k logits 120 nats above the rest: the tail mass (~e^-120) must not underflow to 0, else
    forward KL against a teacher tail > 0 would be +inf (or wrong)."""
    student, ids, t_lp, tail, mask, targets = make_case(seed=2, dtype=torch.float32)
    boosted = student.detach().scatter_add(-1, ids, torch.full(ids.shape, 120.0)).requires_grad_()
    out = distill_loss(boosted, t_lp.float(), mask, teacher_ids=ids, teacher_tail=tail.float())
    ref, _ = reference(boosted, ids, t_lp, tail, mask, targets, loss="forward_kl", temperature=1.0)
    assert torch.isfinite(out.kd_sum)
    assert out.kd_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(out.kd_sum, boosted)
    (grad_ref,) = torch.autograd.grad(ref, boosted)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


def test_bf16_logits_get_bf16_gradients_close_to_fp32():
    student, ids, t_lp, tail, mask, targets = make_case(seed=3, dtype=torch.float32)
    low = student.detach().bfloat16().requires_grad_()
    kw = {"teacher_ids": ids, "teacher_tail": tail.float(), "targets": targets}
    out = distill_loss(low, t_lp.float(), mask, **kw)
    (grad,) = torch.autograd.grad(out.kd_sum + 0.5 * out.ce_sum, low)
    high = low.detach().float().requires_grad_()
    ref = distill_loss(high, t_lp.float(), mask, **kw)
    (grad_ref,) = torch.autograd.grad(ref.kd_sum + 0.5 * ref.ce_sum, high)
    assert grad.dtype == torch.bfloat16
    assert out.kd_sum.item() == pytest.approx(ref.kd_sum.item(), rel=1e-6)
    assert out.ce_sum.item() == pytest.approx(ref.ce_sum.item(), rel=1e-6)
    torch.testing.assert_close(grad.float(), grad_ref, rtol=2e-2, atol=1e-3)  # bf16 rounding of the gradient


def test_saves_no_vocabulary_sized_tensor_beyond_the_logits():
    """Memory contract: autograd keeps the logits (needed by any loss) and nothing else of size rows × vocab,
    so KD costs no more activation memory than CE."""
    student, ids, t_lp, tail, mask, targets = make_case(seed=4, v=4096, k=8)
    big = []

    def pack(t):
        if t.numel() >= student.numel():
            big.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, targets=targets)
    assert set(big) == {student.data_ptr()}
    (out.kd_sum + 0.5 * out.ce_sum).backward()
    assert torch.isfinite(student.grad).all()
