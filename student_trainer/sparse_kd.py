"""Fused top-k + tail-bucket KD over the student's logits: exact, with an analytic backward and no (R, V) tensor
kept beyond the logits themselves.

Autograd through the plain formulation (``logsumexp`` over all ids, ``scatter`` of -inf for the tail,
``logsumexp`` again, ``log_softmax`` for CE) keeps several vocabulary-sized intermediates and re-reads them in
backward: on a 49k vocabulary it cost twice the student's own forward and backward. Here the forward reduces
each row of logits to K+1 numbers (the student log-probs on the teacher's top-k and on the tail bucket) and
the divergence runs on those (R, K+1) tensors only. The backward recomputes the vocabulary-sized part from the
saved logits, block by block, writing the gradient in place:

    lq_c = z_c − lse            (c in the top-k, z = logits / T)
    lq_tail = lse_tail − lse    (lse_tail = logsumexp of z over the ids outside the top-k, computed exactly
                                 with its own max, so a tiny tail never underflows)
    ∂L/∂z_j = g_j − G·q_j                        for j in the top-k
    ∂L/∂z_j = exp(z_j − lse_tail)·(g_tail − G·q_tail)   for j outside it

with g = ∂L/∂lq (autograd over the K+1 classes) and G = Σ g. The CE term (T = 1) reuses lse: its gradient
softmax − onehot(target) is folded into the same pass. Peak extra memory is one block of rows × V.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_NEG_INF = float("-inf")
BLOCK_ROWS = 256  # rows per vocabulary-sized scratch block


def _block_lse(z: Tensor, ids: Tensor, scratch: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(r, V) scaled logits → (z_top (r, k), lse (r,), lse_tail (r,)); ``scratch`` may be overwritten."""
    z_top = z.gather(1, ids)
    buf = z.clone() if scratch is None else scratch
    buf.scatter_(1, ids, _NEG_INF)
    m = buf.amax(1, keepdim=True)
    m = m.masked_fill(torch.isneginf(m), 0.0)  # no tail ids (k = V) or an all -inf tail
    lse_tail = buf.sub_(m).exp_().sum(1).log_().add_(m.squeeze(1))
    lse = torch.logaddexp(lse_tail, torch.logsumexp(z_top, 1))
    return z_top, lse, lse_tail


class _SparseKD(torch.autograd.Function):
    """Outputs (kd_sum, ce_sum, student_mass_sum); see ``sparse_kd_sums``."""

    @staticmethod
    def forward(ctx, logits, ids, t_lp, t_tail, targets, mask, divergence_fn, temperature, t2, with_ce):
        ctx.set_materialize_grads(False)
        work = torch.promote_types(logits.dtype, torch.float32)
        n, v = logits.shape
        k = ids.shape[1]
        lse = logits.new_empty(n, dtype=work)
        lse_tail = torch.empty_like(lse)
        z_top = logits.new_empty(n, k, dtype=work)
        for a in range(0, n, BLOCK_ROWS):
            x = logits[a : a + BLOCK_ROWS]
            z = x.to(work)
            if temperature != 1.0:
                z = z / temperature
            scratch = z if z is not x else None  # a fresh tensor already: reuse it as scratch
            zt, ls, lt = _block_lse(z, ids[a : a + BLOCK_ROWS], scratch)
            z_top[a : a + BLOCK_ROWS], lse[a : a + BLOCK_ROWS], lse_tail[a : a + BLOCK_ROWS] = zt, ls, lt
        lq = torch.cat([z_top - lse[:, None], (lse_tail - lse)[:, None]], 1)
        if k >= v:  # the bucket holds no ids: exactly 0 mass on both sides, whatever the server rounded
            lp_tail = torch.full_like(lse, _NEG_INF)
        else:
            lp_tail = t_tail.to(work)
        lp = torch.cat([t_lp.to(work), lp_tail[:, None]], 1)
        valid = mask.nonzero().squeeze(1)
        kd = divergence_fn(lp[valid], lq[valid]).sum() * t2
        ce = lse.new_zeros(())
        if with_ce:  # T = 1 here, so lse is the CE normalizer
            ce = (lse[valid] - logits[valid, targets[valid]].to(work)).sum()
        s_mass = lq[valid, :k].exp().sum()
        ctx.save_for_backward(logits, ids, targets, lse_tail, lq, lp, valid)
        ctx.divergence_fn, ctx.temperature, ctx.t2, ctx.with_ce = divergence_fn, temperature, t2, with_ce
        ctx.mark_non_differentiable(s_mass)
        return kd, ce, s_mass

    @staticmethod
    def backward(ctx, go_kd, go_ce, _go_mass):
        if go_kd is None and (go_ce is None or not ctx.with_ce):
            return (None,) * 10
        logits, ids, targets, lse_tail, lq, lp, valid = ctx.saved_tensors
        t, work = ctx.temperature, lq.dtype
        n, k = ids.shape
        g = torch.zeros_like(lq)  # ∂(kd·go_kd)/∂lq, zero on masked rows
        if go_kd is not None:
            with torch.enable_grad():
                lq_v = lq[valid].detach().requires_grad_()
                kd = ctx.divergence_fn(lp[valid], lq_v).sum() * ctx.t2
                (g_v,) = torch.autograd.grad(kd, lq_v)
            g[valid] = g_v * go_kd
        q = lq.exp()
        big_g = g.sum(1, keepdim=True)
        top = (g[:, :k] - big_g * q[:, :k]) / t  # ∂/∂logits on the top-k ids
        tail_coef = (g[:, k] - big_g[:, 0] * q[:, k]) / t  # times exp(z − lse_tail) on the others
        ce_w = None
        if ctx.with_ce and go_ce is not None:
            ce_w = torch.zeros(n, dtype=work, device=lq.device)
            ce_w[valid] = go_ce.to(work)
            top = top + ce_w[:, None] * q[:, :k]  # softmax_j = q_j on the top-k at T = 1
            tail_coef = tail_coef + ce_w * q[:, k]
        tail_coef = tail_coef.masked_fill(torch.isneginf(lse_tail), 0.0)
        lse_tail = lse_tail.masked_fill(torch.isneginf(lse_tail), 0.0)
        grad = torch.empty_like(logits, dtype=work)
        for a in range(0, n, BLOCK_ROWS):
            b = slice(a, a + BLOCK_ROWS)
            buf = grad[b]
            x = logits[b]
            if t == 1.0 and x.dtype == work:
                torch.sub(x, lse_tail[b, None], out=buf)
            else:
                buf.copy_(x)
                if t != 1.0:
                    buf.div_(t)
                buf.sub_(lse_tail[b, None])
            buf.scatter_(1, ids[b], _NEG_INF).exp_().mul_(tail_coef[b, None])
            buf.scatter_(1, ids[b], top[b])
            if ce_w is not None:
                buf.scatter_add_(1, targets[b, None], -ce_w[b, None])
        grad = grad.to(logits.dtype)
        return grad, None, None, None, None, None, None, None, None, None


def sparse_kd_sums(
    logits: Tensor,
    ids: Tensor,
    t_lp: Tensor,
    t_tail: Tensor,
    targets: Tensor | None,
    mask: Tensor,
    divergence_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    temperature: float = 1.0,
    scale_t2: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Σ over rows where ``mask`` of the K+1-class divergence (× T² when ``scale_t2``) and of CE (T = 1).

    logits (R, V) student logits (any float dtype, computed in at least fp32); ids (R, k) the teacher's distinct
    top-k ids; t_lp (R, k) and t_tail (R,) the teacher's log-probs at T; targets (R,) or None; mask (R,) bool.
    ``divergence_fn(lp, lq)`` maps (r, K+1) teacher/student log-probs to (r,) and must be differentiable in
    lq. Returns (kd_sum, ce_sum, Σ student mass on the teacher's top-k); the first two are differentiable
    w.r.t. ``logits``. At T ≠ 1 CE is left to the caller (ce_sum is 0): it needs the logits at T = 1.
    """
    with_ce = targets is not None and temperature == 1.0
    t2 = temperature**2 if scale_t2 else 1.0
    tgt = targets.long() if targets is not None else torch.zeros(0, dtype=torch.long, device=logits.device)
    return _SparseKD.apply(
        logits, ids.long(), t_lp, t_tail, tgt, mask.bool(), divergence_fn, temperature, t2, with_ce
    )


def sampled_targets(ids: Tensor, counts: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """RS-KD draws (SAMPLED: ids (..., m) distinct, -1 padded; counts (..., m)) as K+1-class kernel inputs:
    (ids with every -1 replaced by a distinct id not drawn in its row, log w = log(counts / Σ counts), -inf
    on the fillers). With a -inf tail, forward KL through ``sparse_kd_sums`` then has the gradient
    T·(q − w) w.r.t. the logits (scaled by T²/T): an unbiased estimate of forward KL's q − p, since
    E[w] = p (Anshumann et al., https://arxiv.org/abs/2503.16870). Fillers get gradient q, exactly what ids
    outside the draws get through the tail bucket: they only keep the kernel's ids distinct."""
    total = counts.sum(-1, keepdim=True).clamp(min=1)
    log_w = (counts.to(torch.float32) / total).log()
    pad = ids < 0
    if not bool(pad.any()):
        return ids.long(), log_w
    m = ids.shape[-1]
    flat_ids, flat_pad = ids.reshape(-1, m).long(), pad.reshape(-1, m)
    cand = torch.arange(min(2 * m, vocab_size), device=ids.device)
    used = (cand[None, :, None] == flat_ids[:, None, :]).any(-1)  # (R, C): candidate drawn in the row
    free_first = torch.where(used, cand.numel() + cand, cand).sort(-1).values  # free candidates, ascending
    slot = (flat_pad.cumsum(-1) - 1).clamp(min=0)  # the n-th padding slot takes the n-th free candidate
    fillers = free_first.gather(-1, slot.clamp(max=cand.numel() - 1))
    filled = torch.where(flat_pad, fillers, flat_ids)
    return filled.reshape(ids.shape), log_w
