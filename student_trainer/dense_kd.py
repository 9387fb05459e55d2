"""Fused dense KD over the full vocabulary (FULL and HIDDEN signals), block by block, gradient in the forward.

    kd, ce, t_mass, s_mass = dense_kd_sums(logits, teacher_rows, targets, mask, spec, block_rows=256)

`teacher_rows(rows)` returns the teacher's (r, V_s) log-probs at temperature T for `rows` (a slice or an index
tensor) of the flat (N, ·) layout: the FULL rows the server sent (already at T), or the HIDDEN rows through
the teacher's output layer (teacher_head.TeacherHead.logprobs: one (r, H) × (H, V) matmul per block). Only
valid rows are visited, `block_rows` at a time (runs of consecutive valid rows as views, no copies); each
block's vocabulary-sized tensors (student log-probs, teacher log-probs, the gradient terms) exist only while
it is processed, so nothing (N, V) is held but the student's logits and their gradient, and a HIDDEN
teacher's logits are never built whole.

The gradient w.r.t. the logits is computed in the forward pass (the teacher's block is at hand then; in a
backward pass it would be built a second time), straight into one (N, V) buffer, which the backward scales
in place by the incoming gradient and returns, adding CE's own (softmax(x) − onehot, from the saved per-row
logsumexp). So the KD term can be back-propagated once per forward (a second backward through it raises);
CE alone can be differentiated any number of times. Per block, with z = logits / T, lq = log_softmax(z), p
the teacher:

    forward KL (and JSD at β = 0):   L = Σ p·(log p − lq),  ∂L/∂z = q·Σp − p           (closed form)
    any other divergence (losses.py): g = ∂D/∂lq by autograd on the block,  ∂L/∂z = g − q·Σg

times T²/T (Hinton scaling, the 1/T of z).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

TeacherRows = Callable[[slice | Tensor], Tensor]  # rows of the flat layout -> (r, V_s) log-probs at T


def _blocks(valid: Tensor, block: int) -> Iterator[slice | Tensor]:
    """Blocks of at most `block` valid row indices: a slice for a run of consecutive rows, else the indices."""
    for a in range(0, valid.numel(), block):
        idx = valid[a : a + block]
        first, last = int(idx[0]), int(idx[-1])
        yield slice(first, last + 1) if last - first + 1 == idx.numel() else idx


def _forward_kl(lp: Tensor, lq: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Forward KL of a block: row sums (r,), the teacher's mass Σp (r,), ∂/∂z written into `out` (or None)."""
    v_t = lp.shape[1]
    p = lp.exp()
    mass = p.sum(-1)
    kd = torch.linalg.vecdot(p, lp) - torch.linalg.vecdot(p, lq[:, :v_t])  # no temporary of the block's size
    if not bool(torch.isfinite(kd).all()):  # a -inf teacher log-prob (p = 0): mask 0·(-inf) explicitly
        diff = (lp - lq[:, :v_t]).masked_fill_(p == 0, 0.0)
        kd = torch.linalg.vecdot(p, diff)
    if out is not None:
        torch.exp(lq, out=out).mul_(mass[:, None])
        out[:, :v_t].sub_(p)
    return kd, mass, out


def _autograd(
    lp: Tensor, lq: Tensor, divergence_fn, out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    with torch.enable_grad():
        leaf = lq.detach().requires_grad_(out is not None)
        rows = divergence_fn(lp, leaf)
        if out is not None:
            (g,) = torch.autograd.grad(rows.sum(), leaf)
            torch.exp(lq, out=out).mul_(-g.sum(-1, keepdim=True)).add_(g)
    mass = torch.logsumexp(lp, -1).exp()
    return rows.detach(), mass, out


class _DenseKD(torch.autograd.Function):
    """Outputs (kd_sum, ce_sum, teacher_mass_sum, student_mass_sum); see ``dense_kd_sums``."""

    @staticmethod
    def forward(
        ctx, logits, targets, mask, teacher_rows, divergence_fn, temperature, t2, with_ce, block, v_t
    ):
        ctx.set_materialize_grads(False)
        work = torch.promote_types(logits.dtype, torch.float32)
        want_grad = ctx.needs_input_grad[0]
        valid = mask.nonzero().squeeze(1)
        grad = torch.empty(logits.shape, dtype=work, device=logits.device) if want_grad else None
        if grad is not None and valid.numel() < mask.numel():
            grad[~mask] = 0.0
        lse1 = logits.new_zeros(logits.shape[0], dtype=work) if with_ce else None
        kd_sum, ce_sum, t_mass, s_mass = (torch.zeros((), dtype=work, device=logits.device) for _ in range(4))
        for rows in _blocks(valid, block):
            x = logits[rows].to(work)
            lq = torch.log_softmax(x / temperature if temperature != 1.0 else x, -1)
            if with_ce:  # CE at T = 1: at T = 1 lq is log_softmax(x) already
                ls1 = lq if temperature == 1.0 else torch.log_softmax(x, -1)
                tgt = targets[rows, None]
                ce_sum += -ls1.gather(1, tgt).sum()
                lse1[rows] = (x.gather(1, tgt) - ls1.gather(1, tgt))[:, 0]
                del ls1
            lp = teacher_rows(rows).to(work)  # (r, V_s), -inf beyond the teacher's V_t
            out = grad[rows] if grad is not None and isinstance(rows, slice) else None
            if grad is not None and out is None:
                out = torch.empty_like(lq)
            if v_t < lq.shape[1]:
                s_mass += lq[:, :v_t].exp().sum()
            else:
                s_mass += lq.shape[0]  # log_softmax is normalized: all the student's mass is on V_t
            if divergence_fn is None:
                kd, mass, out = _forward_kl(lp[:, :v_t], lq, out)
            else:
                kd, mass, out = _autograd(lp, lq, divergence_fn, out)
            kd_sum += kd.sum() * t2
            t_mass += mass.sum()
            if out is not None:
                if t2 != temperature:
                    out.mul_(t2 / temperature)
                if not isinstance(rows, slice):
                    grad[rows] = out
            del x, lq, lp, out
        ctx.save_for_backward(logits, targets, valid, lse1 if with_ce else None)
        ctx.grad, ctx.with_ce, ctx.block, ctx.used = grad, with_ce, block, False
        ctx.mark_non_differentiable(t_mass, s_mass)
        return kd_sum, ce_sum, t_mass, s_mass

    @staticmethod
    def backward(ctx, go_kd, go_ce, _go_t, _go_s):
        logits, targets, valid, lse1 = ctx.saved_tensors
        if ctx.grad is None:
            return (None,) * 10
        if go_kd is not None and bool(go_kd != 0):  # the buffer, scaled in place (no second (N, V) tensor)
            if ctx.used:
                raise RuntimeError("dense KD: its KD term was already back-propagated (once per forward)")
            grad, ctx.used = ctx.grad.mul_(go_kd), True
        else:
            grad = torch.zeros_like(ctx.grad)
        if ctx.with_ce and go_ce is not None and bool(go_ce != 0):
            for rows in _blocks(valid, ctx.block):
                sm = (logits[rows].to(grad.dtype) - lse1[rows, None]).exp_()
                sm.scatter_add_(1, targets[rows, None], torch.full_like(sm[:, :1], -1.0)).mul_(go_ce)
                grad[rows] += sm
        return grad.to(logits.dtype), None, None, None, None, None, None, None, None, None


def dense_kd_sums(
    logits: Tensor,
    teacher_rows: TeacherRows,
    targets: Tensor | None,
    mask: Tensor,
    divergence_fn: Callable[[Tensor, Tensor], Tensor] | None,
    *,
    temperature: float = 1.0,
    scale_t2: bool = True,
    block_rows: int = 256,
    teacher_vocab: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Σ over rows where ``mask`` of D(teacher ‖ student) over the vocabulary (× T² when ``scale_t2``), of CE
    (T = 1, when ``targets`` are given), and of the teacher's / student's mass on the teacher's first
    ``teacher_vocab`` columns (diagnostics, not differentiable).

    logits (N, V_s); teacher_rows(rows) -> (r, V_s) log-probs at T (-inf beyond the teacher's vocabulary);
    targets (N,) or None; mask (N,) bool. ``divergence_fn(lp, lq)`` maps (r, V) log-probs to (r,) and must be
    differentiable in lq; None = forward KL in closed form. The first two sums are differentiable w.r.t.
    ``logits`` (the gradient is made in this call: see the module docstring).
    """
    with_ce = targets is not None
    t2 = temperature**2 if scale_t2 else 1.0
    tgt = targets.long() if with_ce else torch.zeros(0, dtype=torch.long, device=logits.device)
    block = max(int(block_rows), 1)
    v_t = teacher_vocab or logits.shape[-1]
    return _DenseKD.apply(
        logits, tgt, mask.bool(), teacher_rows, divergence_fn, temperature, t2, with_ce, block, v_t
    )
