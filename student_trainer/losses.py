"""Knowledge-distillation losses: exact divergences over a dense vocabulary or over top-k + one tail bucket.

Pure torch functions, no state. The teacher P and the student Q are given as log-probabilities; every
divergence takes ``(teacher_logprobs, student_logprobs)`` in that order and sums over the last dimension.

Sparse (``TOP_K``) losses are real divergences over K+1 classes: the teacher's k ids plus a *tail bucket*
holding all other ids. The teacher side of the bucket is the server's exact ``tail_logprob``; the student side
is ``logsumexp`` of the student's logits over the ids outside the teacher's top-k, minus the full
``logsumexp`` (exact, no ``log1p(-sum)`` cancellation). Top-k renormalized *without* the tail is worse than
plain training, so it is deliberately not offered.

Conventions (see the functions for details):
- Temperature T: student logits are divided by T; teacher values arrive already at T from the server. The KD
  term is multiplied by T² (Hinton et al. 2015, https://arxiv.org/abs/1503.02531) unless ``scale_t2=False``.
  CE always uses the raw logits (T = 1).
- Generalized JSD(β) follows TRL's ``generalized_jsd_loss`` (GKD, https://arxiv.org/abs/2306.13649):
  M = βP + (1−β)Q, JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M) for 0 < β < 1, and the endpoints are defined as
  β = 0 → KL(P‖Q) (forward) and β = 1 → KL(Q‖P) (reverse). The mixture formula itself tends to 0 at both
  ends (≈ β·KL(P‖Q) near 0), so values are discontinuous at the endpoints, exactly as in TRL.
- Skew KL (DistiLLM, https://arxiv.org/abs/2402.03898): skew forward = KL(P ‖ αP + (1−α)Q), skew reverse =
  KL(Q ‖ αQ + (1−α)P); α = 0 gives plain forward / reverse KL.
- Zero-probability classes (-inf log-probs) never produce NaN values or gradients; a divergence is +inf only
  where it truly is (e.g. reverse KL with student mass where the teacher has none).
- Padded vocabulary: the student may have more columns than the teacher (V_s ≥ V_t, e.g. 151936 → 152064).
  Sparse: the extra student columns belong to the tail bucket. Dense: teacher log-probs beyond V_t are -inf.
- Dense teachers (FULL rows, or HIDDEN rows + the teacher's output layer) run through the fused kernel of
  dense_kd.py in blocks of ``chunk_rows`` valid rows: a HIDDEN teacher's logits exist one block at a time.
- ``sampled_reverse_kl`` (``sampled_reverse_kl_sums``) is not a divergence over classes: it needs only the
  teacher's log-prob of each target token (TARGET_ONLY) and is the policy-gradient loss of on-policy KD.
- Sums, not a mix: ``distill_loss`` returns the KD sum and the CE sum (whenever targets are given) over the
  valid rows, separately; the caller weights and adds them (the trainer: kd_weight·KD + ce_weight·CE) and
  divides by the global number of target tokens (across accumulation steps and ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from student_trainer.dense_kd import dense_kd_sums
from student_trainer.sparse_kd import sparse_kd_sums

LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
# Losses on the target tokens only (the teacher's TARGET_ONLY answer), not divergences over classes.
TOKEN_LOSS_NAMES = ("sampled_reverse_kl",)
_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------- divergences
def _sanitize(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Set classes where both sides are -inf to 0 so no op sees ``-inf - -inf``; also return that mask."""
    dead = torch.isneginf(lp) & torch.isneginf(lq)
    return lp.masked_fill(dead, 0.0), lq.masked_fill(dead, 0.0), dead


def _x_log_ratio(lx: Tensor, ly: Tensor) -> Tensor:
    """Per class x·(log x − log y) with x = exp(lx); exactly 0 where x = 0, with zero (not NaN) gradient."""
    empty = torch.isneginf(lx)
    lx_safe = lx.masked_fill(empty, 0.0)  # keeps 0·(-inf) out of both the value and the backward pass
    return torch.where(empty, 0.0, lx_safe.exp() * (lx_safe - ly))


def _log_mix(la: Tensor, lb: Tensor, w: float) -> Tensor:
    """log(w·a + (1 − w)·b) from log a, log b, for w in [0, 1]."""
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def forward_kl(teacher_lp: Tensor, student_lp: Tensor) -> Tensor:
    """KL(P‖Q) = Σ p·(log p − log q). Inputs (..., C) log-probs; returns (...)."""
    lp, lq, dead = _sanitize(teacher_lp, student_lp)
    return _x_log_ratio(lp, lq).masked_fill(dead, 0.0).sum(-1)


def reverse_kl(teacher_lp: Tensor, student_lp: Tensor) -> Tensor:
    """KL(Q‖P) = Σ q·(log q − log p). Inputs (..., C) log-probs; returns (...)."""
    lp, lq, dead = _sanitize(teacher_lp, student_lp)
    return _x_log_ratio(lq, lp).masked_fill(dead, 0.0).sum(-1)


def generalized_jsd(teacher_lp: Tensor, student_lp: Tensor, beta: float = 0.5) -> Tensor:
    """TRL/GKD generalized JSD: β·KL(P‖M) + (1−β)·KL(Q‖M), M = βP + (1−β)Q; β=0 → KL(P‖Q), β=1 → KL(Q‖P).

    Inputs (..., C) log-probs; returns (...).
    """
    if beta == 0.0:
        return forward_kl(teacher_lp, student_lp)
    if beta == 1.0:
        return reverse_kl(teacher_lp, student_lp)
    lp, lq, dead = _sanitize(teacher_lp, student_lp)
    lm = _log_mix(lp, lq, beta)
    terms = beta * _x_log_ratio(lp, lm) + (1.0 - beta) * _x_log_ratio(lq, lm)
    return terms.masked_fill(dead, 0.0).sum(-1)


def total_variation(teacher_lp: Tensor, student_lp: Tensor) -> Tensor:
    """TVD = ½ Σ |p − q|. Inputs (..., C) log-probs; returns (...)."""
    return 0.5 * (teacher_lp.exp() - student_lp.exp()).abs().sum(-1)


def skew_forward_kl(teacher_lp: Tensor, student_lp: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew forward KL: KL(P ‖ αP + (1−α)Q). Inputs (..., C) log-probs; returns (...)."""
    lp, lq, dead = _sanitize(teacher_lp, student_lp)
    return _x_log_ratio(lp, _log_mix(lp, lq, alpha)).masked_fill(dead, 0.0).sum(-1)


def skew_reverse_kl(teacher_lp: Tensor, student_lp: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew reverse KL: KL(Q ‖ αQ + (1−α)P). Inputs (..., C) log-probs; returns (...)."""
    lp, lq, dead = _sanitize(teacher_lp, student_lp)
    return _x_log_ratio(lq, _log_mix(lq, lp, alpha)).masked_fill(dead, 0.0).sum(-1)


def divergence(
    teacher_lp: Tensor, student_lp: Tensor, loss: str = "forward_kl", *, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Dispatch on ``loss`` (one of ``LOSS_NAMES``). Inputs (..., C) log-probs; returns (...)."""
    if loss == "forward_kl":
        return forward_kl(teacher_lp, student_lp)
    if loss == "reverse_kl":
        return reverse_kl(teacher_lp, student_lp)
    if loss == "jsd":
        return generalized_jsd(teacher_lp, student_lp, beta)
    if loss == "tvd":
        return total_variation(teacher_lp, student_lp)
    if loss == "skew_forward_kl":
        return skew_forward_kl(teacher_lp, student_lp, alpha)
    if loss == "skew_reverse_kl":
        return skew_reverse_kl(teacher_lp, student_lp, alpha)
    raise ValueError(f"loss must be one of {LOSS_NAMES}, got {loss!r}")


# --------------------------------------------------------------------------------------- row-level losses
@dataclass(frozen=True)
class KDSpec:
    """Which divergence and how to scale it; validated once."""

    loss: str = "forward_kl"
    beta: float = 0.5  # generalized JSD only
    alpha: float = 0.1  # skew KLs only
    temperature: float = 1.0
    scale_t2: bool = True  # multiply the KD term by T² (Hinton scaling)

    def __post_init__(self) -> None:
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {LOSS_NAMES}, got {self.loss!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class LossOutput:
    """Loss sums over the valid rows, plus diagnostics (means over valid rows, detached).

    ``kd_sum`` is the KD term (× T² unless ``scale_t2=False``); ``ce_sum`` the CE at T = 1 (0 without
    targets); both differentiable, neither weighted. ``teacher_mass_in_support`` is Σ exp(teacher log-probs
    given), i.e. 1 − tail for TOP_K; ``student_mass_in_teacher_topk`` is the student mass on the same ids (on
    the first V_t columns for dense teachers). Both are 0 when there are no valid rows.
    """

    kd_sum: Tensor
    ce_sum: Tensor
    num_tokens: int
    teacher_mass_in_support: Tensor
    student_mass_in_teacher_topk: Tensor


def _sparse_sums(
    logits: Tensor,
    t_lp: Tensor,
    t_ids: Tensor,
    t_tail: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    spec: KDSpec,
) -> Tensor:
    """All rows → [kd_sum, ce_sum, teacher_mass_sum, student_mass_sum] over rows in ``mask``, through the fused
    K+1-class kernel (sparse_kd.py), which skips masked rows itself and needs no chunks."""
    div = partial(divergence, loss=spec.loss, beta=spec.beta, alpha=spec.alpha)
    kd, ce, s_mass = sparse_kd_sums(
        logits, t_ids, t_lp, t_tail, targets, mask, div, temperature=spec.temperature, scale_t2=spec.scale_t2
    )
    if targets is not None and spec.temperature != 1.0:  # the kernel's CE is at T = 1 only
        ce = ce_loss_sum(logits, targets, mask)
    t_mass = torch.logsumexp(t_lp[mask].to(kd.dtype), -1).exp().sum()
    return torch.stack([kd, ce.to(kd.dtype), t_mass, s_mass])


def _dense_kernel_sums(
    logits: Tensor, teacher: Tensor, head, targets: Tensor | None, mask: Tensor, spec: KDSpec, block: int
) -> Tensor:
    """All rows → [kd_sum, ce_sum, teacher_mass_sum, student_mass_sum] through the fused dense kernel; the
    teacher is (N, V_t) log-probs at T, or (N, H) hidden rows with ``head`` (teacher_head.TeacherHead)."""
    v_s = logits.shape[-1]
    if head is not None:
        v_t = min(head.vocab_size, v_s)

        def rows(idx: Tensor) -> Tensor:
            return head.logprobs(teacher[idx], spec.temperature, v_s)
    else:
        v_t = teacher.shape[-1]

        def rows(idx: Tensor) -> Tensor:  # padded vocab: the teacher has no mass beyond V_t
            return F.pad(teacher[idx], (0, v_s - v_t), value=_NEG_INF) if v_t < v_s else teacher[idx]

    closed_form = spec.loss == "forward_kl" or (spec.loss == "jsd" and spec.beta == 0.0)
    div = None if closed_form else partial(divergence, loss=spec.loss, beta=spec.beta, alpha=spec.alpha)
    sums = dense_kd_sums(
        logits, rows, targets, mask, div, temperature=spec.temperature, scale_t2=spec.scale_t2,
        block_rows=block, teacher_vocab=v_t,
    )  # fmt: skip
    return torch.stack([s.to(sums[0].dtype) for s in sums])


def _flat_inputs(
    n: int, teacher: tuple[Tensor, Tensor | None, Tensor | None], targets: Tensor | None, mask: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """Check that every input has N rows (any leading shape, e.g. (B, T)) and flatten it to N rows."""
    t_lp, t_ids, t_tail = teacher
    if (t_ids is None) != (t_tail is None):
        raise ValueError("teacher_ids and teacher_tail come together (TOP_K) or not at all (FULL)")
    if t_ids is not None and t_ids.shape != t_lp.shape:
        raise ValueError(f"teacher_ids {tuple(t_ids.shape)} and teacher_logprobs {tuple(t_lp.shape)} differ")
    rows = {"mask": mask.numel(), "teacher_logprobs": math.prod(t_lp.shape[:-1])}
    rows |= {} if t_tail is None else {"teacher_tail": t_tail.numel()}
    rows |= {} if targets is None else {"targets": targets.numel()}
    if any(r != n for r in rows.values()):
        raise ValueError(f"the student has {n} rows, but got rows {rows}")
    flat = [None if t is None else t.reshape(n, -1) for t in (t_lp, t_ids)]
    flat += [None if t is None else t.reshape(n) for t in (t_tail, targets, mask)]
    return tuple(flat)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ public API
def distill_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    teacher_ids: Tensor | None = None,
    teacher_tail: Tensor | None = None,
    teacher_head=None,
    targets: Tensor | None = None,
    chunk_rows: int | None = None,
    loss: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_t2: bool = True,
) -> LossOutput:
    """KD sum and, with ``targets``, CE sum over rows where ``mask`` is true, returned separately (unmixed).

    student_logits (N, V_s) or (B, T, V_s); mask (N,) bool; targets (N,) token ids (CE at T = 1). Every other
    row argument has the same leading shape as the logits. Sparse teacher (TOP_K): ``teacher_ids`` (N, k)
    distinct ids, ``teacher_logprobs`` (N, k), ``teacher_tail`` (N,) = log of the mass outside the top-k
    (-inf when none); the fused kernel runs once on all rows and needs no chunks. Dense teacher (FULL):
    ``teacher_logprobs`` (N, V_t), V_t ≤ V_s. HIDDEN: ``teacher_logprobs`` are the teacher's (N, H) final
    hidden rows and ``teacher_head`` its output layer (teacher_head.TeacherHead), which makes each block's
    exact log-probs at T. Dense teachers run through dense_kd.py on the valid rows only, ``chunk_rows`` (None:
    all) at a time, so at most one block's (chunk_rows, V) intermediates are held.
    """
    spec = KDSpec(loss, beta, alpha, temperature, scale_t2)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = (teacher_logprobs, teacher_ids, teacher_tail)
    t_lp, t_ids, t_tail, targets, mask = _flat_inputs(logits.shape[0], teacher, targets, mask)
    if teacher_head is None and t_lp.shape[-1] > logits.shape[-1]:
        what = "vocab size" if t_ids is None else "top-k k"
        raise ValueError(f"teacher {what}={t_lp.shape[-1]} exceeds student vocab {logits.shape[-1]}")

    num = int(mask.sum())
    if t_ids is not None:
        assert t_tail is not None
        sums = _sparse_sums(logits, t_lp, t_ids, t_tail, targets, mask, spec)
    else:  # prompt/padding rows never reach the vocab-sized work
        block = chunk_rows or max(num, 1)
        sums = _dense_kernel_sums(logits, t_lp, teacher_head, targets, mask, spec, block)
    kd_sum, ce_sum, t_mass, s_mass = sums.unbind()
    return LossOutput(
        kd_sum=kd_sum,
        ce_sum=ce_sum,
        num_tokens=num,
        teacher_mass_in_support=t_mass / max(num, 1),
        student_mass_in_teacher_topk=s_mass / max(num, 1),
    )


def ce_loss_sum(student_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Σ over masked rows of −log softmax(logits)[target] (T = 1). logits (N, V), targets (N,), mask (N,)."""
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ignored = targets.reshape(-1).long().masked_fill(~mask.reshape(-1).bool(), -100)  # no row copies
    return F.cross_entropy(logits, ignored, ignore_index=-100, reduction="sum")


def sampled_reverse_kl_sums(
    student_logits: Tensor,
    teacher_target_logprob: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    scale_t2: bool = True,
) -> tuple[Tensor, Tensor, int]:
    """Sampled-token reverse KL (on-policy distillation: Thinking Machines' blog, slime, prime-rl):
    (kd_sum, ce_sum, num_tokens) over the rows in ``mask``.

    student_logits (N, V) or (B, T, V); teacher_target_logprob (N,) = log p_T(x_t), the teacher's log-prob of
    each row's target token x_t (the TARGET_ONLY signal: 4 bytes per token); targets (N,) = x_t; mask (N,).
    With log q(x_t) the student's, the per-token advantage is A_t = log p_T(x_t) − log q(x_t) (no gradient).

    - Differentiated: the surrogate −Σ_t A_t · log q(x_t), whose gradient
      Σ_t (log q − log p_T)(x_t) ∇log q(x_t) is the score-function (policy-gradient) estimate of ∇ KL(Q‖P)
      when x_t ~ Q (on-policy; E_Q[∇log q] = 0).
    - Reported (the value of ``kd_sum``): Σ_t (log q(x_t) − log p_T(x_t)), an unbiased estimate of the
      reverse KL summed over rows when x_t ~ Q. ``kd_sum`` carries both: value = the estimate, gradient = the
      surrogate's (estimate.detach() + surrogate − surrogate.detach()).

    Each token's advantage is its own log-ratio (no sum over the tokens after it: the per-token reverse KL
    of those recipes, each context held fixed). On dataset tokens (off-policy) the same gradient pulls each
    log q(x_t) toward log p_T(x_t) (it is the gradient of ½ Σ (log q − log p_T)²), and the value is no longer
    an estimate of KL(Q‖P).
    Temperature T: the teacher's log-probs arrive at T from the server (softmax(z_T / T)); the student divides
    its logits by T; ``kd_sum`` (value and gradient) is × T² unless ``scale_t2=False``, as in the other
    losses. The estimate is of KL(Q_T‖P_T) when x_t ~ Q_T, i.e. rollouts sampled at T (on-policy:
    distill.gen_temperature = distill.temperature). CE (with the same targets) is at T = 1.
    """
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    n = logits.shape[0]
    rows = {"teacher_target_logprob": teacher_target_logprob.numel(), "targets": targets.numel()}
    if any(r != n for r in (*rows.values(), mask.numel())):
        raise ValueError(f"the student has {n} rows, but got rows {rows | {'mask': mask.numel()}}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = mask.reshape(n).bool()
    sel = logits[keep].to(torch.promote_types(logits.dtype, torch.float32))  # valid rows only
    x = targets.reshape(n)[keep].long()
    lp = teacher_target_logprob.reshape(n)[keep].to(sel.dtype)
    lq_1 = -F.cross_entropy(sel, x, reduction="none")  # log q(x_t) at T = 1
    lq = lq_1 if temperature == 1.0 else -F.cross_entropy(sel / temperature, x, reduction="none")
    advantage = (lp - lq).detach()
    surrogate = -(advantage * lq).sum()
    kd = (lq - lp).detach().sum() + (surrogate - surrogate.detach())
    if scale_t2:
        kd = kd * temperature**2
    return kd, -lq_1.sum(), int(keep.sum())
