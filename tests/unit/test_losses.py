"""KD losses against an independent brute-force reference (python floats, full-vocab probabilities, float64)."""

import math

import pytest
import torch

from student_trainer.losses import (
    LOSS_NAMES,
    ce_loss_sum,
    distill_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)

BETA, ALPHA = 0.3, 0.2


# --------------------------------------------------------------------------------------------- reference
def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def ref_div(p: list[float], q: list[float], loss: str, beta: float = BETA, alpha: float = ALPHA) -> float:
    """Textbook definitions on probability vectors (TRL endpoints for JSD, DistiLLM for skew KLs)."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return ref_kl(p, q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return ref_kl(q, p)
    if loss == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if loss == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    if loss == "skew_forward_kl":
        return ref_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])
    if loss == "skew_reverse_kl":
        return ref_kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q, strict=True)])
    raise AssertionError(loss)


def softmax_row(logits: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(x / temperature) for x in logits]
    return [x / sum(e) for x in e]


def coarsen(p: list[float], ids: list[int]) -> list[float]:
    """Probabilities at ``ids`` followed by the summed mass of every other id (the tail bucket)."""
    return [p[i] for i in ids] + [sum(x for j, x in enumerate(p) if j not in ids)]


def make_case(n=6, v=9, v_t=None, k=None, temperature=1.0, seed=0):
    """Random student logits (N, V), teacher full probabilities (N, V_t) and its TOP_K view at ``k``."""
    g = torch.Generator().manual_seed(seed)
    v_t = v_t or v
    student = (2 * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    teacher_logits = 3 * torch.randn(n, v_t, generator=g, dtype=torch.float64)
    t_full = torch.log_softmax(teacher_logits / temperature, -1)
    k = k or v_t
    t_lp, ids = t_full.topk(k, -1)
    rest = t_full.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1) if k < v_t else torch.full((n,), float("-inf"), dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True][:n])
    return student, t_full, ids, t_lp, tail, mask


def reference_sum(student, t_full, ids, mask, loss, temperature=1.0, sparse=True, **kw) -> float:
    total = 0.0
    for r in range(student.shape[0]):
        if not mask[r]:
            continue
        q = softmax_row(student[r].tolist(), temperature)
        p = t_full[r].exp().tolist() + [0.0] * (len(q) - t_full.shape[1])
        if sparse:
            p, q = coarsen(p, ids[r].tolist()), coarsen(q, ids[r].tolist())
        total += ref_div(p, q, loss, **kw)
    return total


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_sparse_and_dense_equal_reference_when_k_equals_v(loss):
    student, t_full, ids, t_lp, tail, mask = make_case()
    ref = reference_sum(student, t_full, ids, mask, loss, sparse=False)
    sparse = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss, beta=BETA, alpha=ALPHA
    )
    dense = distill_loss(student, t_full, mask, loss=loss, beta=BETA, alpha=ALPHA)
    assert sparse.kd_sum.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert dense.kd_sum.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert sparse.num_tokens == dense.num_tokens == 4
    rounded = torch.full_like(tail, math.log(1e-7))  # k = V: the bucket is empty whatever tail is reported
    again = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=rounded, loss=loss, beta=BETA, alpha=ALPHA
    )
    assert again.kd_sum.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_sparse_is_exact_divergence_over_topk_plus_tail_bucket(loss):
    student, t_full, ids, t_lp, tail, mask = make_case(k=3)
    ref = reference_sum(student, t_full, ids, mask, loss)
    out = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss, beta=BETA, alpha=ALPHA
    )
    assert out.kd_sum.item() == pytest.approx(ref, rel=1e-10)


def test_tail_aware_loss_is_not_renormalized_topk():
    student, t_full, ids, t_lp, tail, mask = make_case(k=2)
    assert tail[mask].exp().mean() > 0.1  # the tail mass is non-trivial
    renorm = 0.0
    for r in torch.nonzero(mask).flatten().tolist():
        p = [t_full[r, i].exp().item() for i in ids[r]]
        q_all = softmax_row(student[r].tolist())
        q = [q_all[i] for i in ids[r]]
        renorm += ref_kl([x / sum(p) for x in p], [y / sum(q) for y in q])
    out = distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail)
    assert out.kd_sum.item() == pytest.approx(reference_sum(student, t_full, ids, mask, "forward_kl"))
    assert abs(out.kd_sum.item() - renorm) > 0.1 * renorm


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, t_full, *_ = make_case()
    lq = torch.log_softmax(student, -1)
    assert torch.equal(generalized_jsd(t_full, lq, 0.0), forward_kl(t_full, lq))
    assert torch.equal(generalized_jsd(t_full, lq, 1.0), reverse_kl(t_full, lq))
    p, q = t_full[0].exp().tolist(), lq[0].exp().tolist()
    assert generalized_jsd(t_full, lq, 0.5)[0].item() == pytest.approx(ref_div(p, q, "jsd", beta=0.5))


def test_temperature_divides_student_logits_and_scales_by_t_squared():
    temperature = 2.0
    student, t_full, ids, t_lp, tail, mask = make_case(k=4, temperature=temperature)
    ref = reference_sum(student, t_full, ids, mask, "forward_kl", temperature=temperature)
    scaled = distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, temperature=temperature)
    plain = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, temperature=temperature, scale_t2=False
    )
    assert plain.kd_sum.item() == pytest.approx(ref, rel=1e-10)
    assert scaled.kd_sum.item() == pytest.approx(temperature**2 * ref, rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [True, False])
def test_one_call_returns_exact_kd_sum_and_exact_ce_sum(temperature, sparse):
    student, t_full, ids, t_lp, tail, mask = make_case(k=4, temperature=temperature)
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    ref_kd = temperature**2 * reference_sum(student, t_full, ids, mask, "jsd", temperature, sparse=sparse)
    ref_ce = sum(-math.log(softmax_row(student[r].tolist())[targets[r]]) for r in range(6) if mask[r])
    teacher = {"teacher_ids": ids, "teacher_tail": tail} if sparse else {}
    t_arg = t_lp if sparse else t_full
    out = distill_loss(
        student, t_arg, mask, targets=targets, loss="jsd", beta=BETA, temperature=temperature, **teacher
    )
    assert out.kd_sum.item() == pytest.approx(ref_kd, rel=1e-10)  # KD alone: no CE mixed in
    assert out.ce_sum.item() == pytest.approx(ref_ce, rel=1e-10)  # CE at T = 1 whatever the temperature
    assert ce_loss_sum(student, targets, mask).item() == pytest.approx(ref_ce, rel=1e-10)
    (g_kd,) = torch.autograd.grad(out.kd_sum, student, retain_graph=True)
    (g_ce,) = torch.autograd.grad(out.ce_sum, student)
    (g_ref,) = torch.autograd.grad(ce_loss_sum(student, targets, mask), student)
    torch.testing.assert_close(g_ce, g_ref, rtol=1e-10, atol=1e-12)  # each sum carries its own gradient
    assert torch.any(g_kd != 0) and not torch.allclose(g_kd, g_ce)


def test_diagnostics_on_hand_computed_example():
    student = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]).log()
    ids = torch.tensor([[0, 1], [3, 2]])
    t_lp = torch.tensor([[0.5, 0.3], [0.6, 0.2]]).log()
    tail = torch.tensor([0.2, 0.2]).log()
    out = distill_loss(student, t_lp, torch.tensor([True, True]), teacher_ids=ids, teacher_tail=tail)
    assert out.teacher_mass_in_support.item() == pytest.approx(0.8)
    assert out.student_mass_in_teacher_topk.item() == pytest.approx((0.3 + 0.5) / 2)
    # forward KL over 3 classes by hand, row 0: p = (.5, .3, .2), q = (.1, .2, .7)
    row0 = 0.5 * math.log(5) + 0.3 * math.log(1.5) + 0.2 * math.log(0.2 / 0.7)
    row1 = 0.6 * math.log(2.4) + 0.2 * math.log(0.8) + 0.2 * math.log(0.4)
    assert out.kd_sum.item() == pytest.approx(row0 + row1, rel=1e-5)


# ------------------------------------------------------------------------------------ padded vocabulary
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_padded_student_vocab(loss):
    student, t_full, ids, t_lp, tail, mask = make_case(v=9, v_t=7, k=3)
    ref = reference_sum(student, t_full, ids, mask, loss)  # extra student columns land in the tail bucket
    out = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss, beta=BETA, alpha=ALPHA
    )
    assert out.kd_sum.item() == pytest.approx(ref, rel=1e-10)
    dense = distill_loss(student, t_full, mask, loss=loss, beta=BETA, alpha=ALPHA)
    if loss == "reverse_kl":  # the student has mass where the teacher has none: truly infinite
        assert dense.kd_sum.item() == math.inf
    else:
        ref = reference_sum(student, t_full, ids, mask, loss, sparse=False)
        assert dense.kd_sum.item() == pytest.approx(ref, rel=1e-10)
    masses = [sum(softmax_row(student[r].tolist())[:7]) for r in range(6) if mask[r]]
    assert dense.student_mass_in_teacher_topk.item() == pytest.approx(sum(masses) / 4)
    assert dense.teacher_mass_in_support.item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- gradients / edges
def finite_grads(out, student) -> bool:
    (grad,) = torch.autograd.grad(out.kd_sum, student)
    return bool(torch.isfinite(out.kd_sum) and torch.isfinite(grad).all())


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_finite_gradients_with_k_equal_v_and_ragged_mask(loss):
    student, _, ids, t_lp, tail, mask = make_case()
    out = distill_loss(
        student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss, beta=BETA, alpha=ALPHA
    )
    assert finite_grads(out, student)
    (grad,) = torch.autograd.grad(
        distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss).kd_sum, student
    )
    assert torch.all(grad[~mask] == 0) and torch.any(grad[mask] != 0)


@pytest.mark.parametrize("loss", [n for n in LOSS_NAMES if n != "reverse_kl"])
@pytest.mark.parametrize("sparse", [True, False])
def test_finite_gradients_with_zero_probability_teacher_classes(loss, sparse):
    student, t_full, ids, t_lp, tail, mask = make_case(k=4)
    t_full = t_full.clone()
    t_full[:, :3] = float("-inf")  # the teacher has no mass on some ids (e.g. banned tokens)
    t_full = torch.log_softmax(t_full, -1)
    t_lp, ids = t_full.topk(7, -1)  # the last top-k entry is -inf
    tail = torch.logsumexp(t_full.scatter(-1, ids, float("-inf")), -1)  # -inf: no mass outside
    if sparse:
        out = distill_loss(
            student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, loss=loss, beta=BETA, alpha=ALPHA
        )
    else:
        out = distill_loss(student, t_full, mask, loss=loss, beta=BETA, alpha=ALPHA)
    assert finite_grads(out, student)
    assert out.kd_sum.item() == pytest.approx(
        reference_sum(student, t_full, ids, mask, loss, sparse=sparse), rel=1e-10
    )


def test_reverse_kl_is_infinite_only_where_it_truly_is():
    lp = torch.tensor([[0.0, float("-inf")]])
    lq = torch.log_softmax(torch.zeros(1, 2, requires_grad=True), -1)
    assert reverse_kl(lp, lq).item() == math.inf
    assert forward_kl(lp, lq).item() == pytest.approx(math.log(2))
    lq_dead = torch.tensor([[0.0, float("-inf")]], requires_grad=True)
    for name in LOSS_NAMES:  # both sides -inf: zero contribution, zero gradient
        value = divergence(lp, lq_dead, name)
        (grad,) = torch.autograd.grad(value.sum(), lq_dead)
        assert value.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("zero_side", ["teacher", "student"])
def test_divergences_give_finite_gradients_to_both_sides(loss, zero_side):
    with_zero = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64).log().requires_grad_()
    full = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64).log().requires_grad_()
    lp, lq = (with_zero, full) if zero_side == "teacher" else (full, with_zero)
    infinite = {"teacher": "reverse_kl", "student": "forward_kl"}[zero_side]  # mass where the other has none
    value = divergence(lp, lq, loss, beta=BETA, alpha=ALPHA)
    p, q = lp.exp()[0].tolist(), lq.exp()[0].tolist()
    if loss == infinite:
        assert value.item() == math.inf
        return
    assert value.item() == pytest.approx(ref_div(p, q, loss), rel=1e-12)
    grads = torch.autograd.grad(value.sum(), (lp, lq))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("chunk_rows", [None, 2])
@pytest.mark.parametrize("sparse", [True, False])
def test_all_masked_batch_gives_zero_and_backward_works(chunk_rows, sparse):
    student, t_full, ids, t_lp, tail, _ = make_case(k=3)
    mask = torch.zeros(6, dtype=torch.bool)
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    teacher = {"teacher_ids": ids, "teacher_tail": tail} if sparse else {}
    t_arg = t_lp if sparse else t_full
    out = distill_loss(student, t_arg, mask, targets=targets, loss="jsd", chunk_rows=chunk_rows, **teacher)
    (grad,) = torch.autograd.grad(out.kd_sum + out.ce_sum, student)
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() == 0.0 and out.num_tokens == 0
    assert torch.all(grad == 0) and out.teacher_mass_in_support.item() == 0.0


def test_bf16_logits_are_upcast():
    student, t_full, ids, t_lp, tail, mask = make_case(k=3)
    low = student.detach().bfloat16().requires_grad_()
    out = distill_loss(low, t_lp.float(), mask, teacher_ids=ids, teacher_tail=tail.float())
    assert out.kd_sum.dtype == torch.float32
    ref = reference_sum(student.detach().bfloat16().double(), t_full, ids, mask, "forward_kl")
    assert out.kd_sum.item() == pytest.approx(ref, rel=1e-4)


# --------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("sparse", [True, False])
def test_chunk_rows_give_the_same_sums_and_gradients(sparse):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t_full = torch.log_softmax(torch.randn(2, 3, 10, generator=g, dtype=torch.float64), -1)  # V_t < V_s
    t_lp, ids = t_full.topk(4, -1)
    tail = torch.logsumexp(t_full.scatter(-1, ids, float("-inf")), -1)
    teacher = {"teacher_ids": ids, "teacher_tail": tail} if sparse else {}
    mask = torch.tensor([[False, True, True], [True, False, True]])
    targets = torch.randint(0, 10, (2, 3), generator=g)
    kw = dict(targets=targets, loss="jsd", temperature=1.5, **teacher)
    t_arg = t_lp if sparse else t_full

    whole = distill_loss(logits, t_arg, mask, **kw)
    chunked = distill_loss(logits, t_arg, mask, chunk_rows=3, **kw)
    (grad_whole,) = torch.autograd.grad(whole.kd_sum + 0.3 * whole.ce_sum, logits)
    (grad_chunked,) = torch.autograd.grad(chunked.kd_sum + 0.3 * chunked.ce_sum, logits)
    for name in ("kd_sum", "ce_sum", "teacher_mass_in_support", "student_mass_in_teacher_topk"):
        assert getattr(chunked, name).item() == pytest.approx(getattr(whole, name).item(), rel=1e-12)
    assert whole.kd_sum.item() > 0 and whole.ce_sum.item() > 0 and chunked.num_tokens == whole.num_tokens == 4
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-12, atol=1e-12)
    assert torch.all(grad_whole[~mask] == 0) and torch.any(grad_whole[mask] != 0)


@pytest.mark.parametrize("sparse", [True, False])
def test_masked_rows_never_reach_the_loss(sparse):
    student, t_full, ids, t_lp, tail, mask = make_case(k=3)
    student = student.detach().clone()
    student[~mask] = float("nan")  # garbage in prompt/padding rows must not leak into the loss
    targets = torch.tensor([1, 2, 3, 4, 5, 6])
    teacher = {"teacher_ids": ids, "teacher_tail": tail} if sparse else {}
    out = distill_loss(student, t_lp if sparse else t_full, mask, targets=targets, chunk_rows=1, **teacher)
    assert torch.isfinite(out.kd_sum) and torch.isfinite(out.ce_sum)


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "kl"}, "loss must be one of"),
        ({"beta": 1.5}, "beta must be in"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"chunk_rows": 0}, "chunk_rows must be >= 1"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    student, _, ids, t_lp, tail, mask = make_case(k=3)
    with pytest.raises(ValueError, match=message):
        distill_loss(student, t_lp, mask, teacher_ids=ids, teacher_tail=tail, **kwargs)


def test_bad_shapes_are_rejected():
    student, t_full, ids, t_lp, _, mask = make_case(v=5, v_t=7)
    with pytest.raises(ValueError, match="teacher vocab size=7 exceeds student vocab 5"):
        distill_loss(student, t_full, mask)
    with pytest.raises(ValueError, match="rows"):
        distill_loss(student, t_full[:4], mask)
    with pytest.raises(ValueError, match="come together"):
        distill_loss(student, t_lp, mask, teacher_ids=ids)
