"""One optimizer step's math: the loss of a micro-batch, gradient accumulation normalized over the global batch,
AdamW and its schedule. The loop around it is trainer.py.

One optimizer step = `grad_accum_steps` micro-batches per rank. Loss normalization: every micro-batch's loss
is a *sum* over its target rows (loss_mask & teacher.valid); before any backward the step's target count is
summed over the micro-batches and all-reduced over ranks (N), and each micro-batch back-propagates
sum × dp_size / N. FSDP averages gradients over the dp ranks (÷ dp_size), so the accumulated gradient is
Σ_ranks Σ_micro ∇sum / N: exactly the gradient of the mean loss over all target tokens of the global batch,
however tokens are spread over micro-batches and ranks.

Signals (the fields of the TeacherBatch say which): TOP_K and AT_IDS go through the fused K+1-class kernel
(sparse_kd.py); SAMPLED through the same kernel with the draws' weights (sparse_kd.sampled_targets) plus the
value correction Σ w·(log p − log w) (constant: it makes the reported KD an unbiased estimate of KL(P‖Q), not
of KL(P̂‖Q)); TARGET_ONLY (loss sampled_reverse_kl) through losses.sampled_reverse_kl_sums; FULL and
HIDDEN through the fused dense kernel (dense_kd.py; HIDDEN with the teacher's output layer, `teacher.head`).
AT_IDS needs the student's ids before the teacher is asked: the micro-batch's `resolve(ids)` is called
between the forward and the loss with the student's top-k ids (B, T-1, k), from these very logits
(detached), so the teacher's wait is part of the step (no prefetch can hide it).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student_trainer import losses
from student_trainer.config import DistillSection, OptimSection
from student_trainer.parallel import all_reduce_sum
from student_trainer.sources.base import MicroBatch, TeacherBatch
from student_trainer.sparse_kd import sampled_targets


# ------------------------------------------------------------------------------------ optimizer, schedule
def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float
) -> float:
    """LR factor for optimizer step `step` (0-based): linear warmup, then cosine down to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim: OptimSection, total_steps: int) -> tuple[Any, Any]:
    """AdamW (weight decay on matrices only) and its LambdaLR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(
            s,
            warmup_steps=optim.warmup_steps,
            total_steps=total_steps,
            schedule=optim.schedule,
            min_lr_ratio=optim.min_lr_ratio,
        ),
    )
    return optimizer, sched


# ------------------------------------------------------------------------------------------------- loss
def target_mask(batch: dict[str, Tensor], teacher: TeacherBatch | None) -> Tensor:
    """(B, T-1) bool: rows that are training targets (and were scored by the teacher, if any)."""
    mask = batch["loss_mask"]
    return mask if teacher is None else mask & teacher.valid.to(mask.device)


def _pad_row(t: Tensor | None, value: float = 0) -> Tensor | None:
    """(B, T-1, ...) → (B, T, ...): one dummy (masked) row so rows line up with the (B·T, V) logits view."""
    if t is None:
        return None
    pad = [0, 0] * (t.dim() - 2) + [0, 1]
    return F.pad(t, pad, value=value)


class LossSums(NamedTuple):
    """Sums over the target rows of one micro-batch; the KD fields are None without a teacher."""

    loss: Tensor  # what is back-propagated (before normalization)
    kd: Tensor | None
    ce: Tensor
    teacher_mass: Tensor | None = None  # Σ teacher probability inside the sent support (1 − tail for TOP_K)
    student_mass: Tensor | None = None  # Σ student probability on the teacher's top-k ids


def loss_sums(
    logits: Tensor, input_ids: Tensor, mask: Tensor, teacher: TeacherBatch | None, distill: DistillSection
) -> LossSums:
    """Loss sums over target rows; logits (B, T, V), mask (B, T-1), teacher rows aligned with mask.

    Without a teacher the loss is CE. With one: kd_weight · KD + ce_weight · CE (see the module docstring for
    each signal; no (B, T, V) tensor is built beyond the student's own logits, and a FULL teacher's rows).
    """
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)  # a view: row b·T + t predicts input_ids[b, t + 1]
    mask_p = _pad_row(mask, False)
    targets = _pad_row(input_ids[:, 1:])
    if teacher is None:
        ce = losses.ce_loss_sum(flat, targets, mask_p)
        return LossSums(ce, None, ce)
    if distill.loss == "sampled_reverse_kl":  # TARGET_ONLY: the teacher's log-prob of each target token
        return _sampled_reverse_kl(flat, targets, mask_p, teacher, distill)
    loss_name, correction = distill.loss, None
    t_lp, t_ids, t_tail, head = teacher.full, None, None, None
    if teacher.counts is not None:  # SAMPLED: forward KL against the draws' weights (config checks the loss)
        t_ids, t_lp = sampled_targets(teacher.ids, teacher.counts, v)
        t_tail, loss_name = torch.full_like(t_lp[..., 0], float("-inf")), "forward_kl"
        correction = _sampled_value_correction(t_lp, teacher.logprobs, mask, distill.temperature)
    elif teacher.ids is not None:  # TOP_K, AT_IDS
        t_lp, t_ids, t_tail = teacher.logprobs, teacher.ids, teacher.tail_logprob
    elif teacher.hidden is not None:
        t_lp, head = teacher.hidden, teacher.head
    out = losses.distill_loss(
        flat,
        _pad_row(t_lp),
        mask_p,
        teacher_ids=_pad_row(t_ids),
        teacher_tail=_pad_row(t_tail),
        teacher_head=head,
        targets=targets,
        chunk_rows=distill.chunk_rows or None,
        loss=loss_name,
        beta=distill.beta,
        alpha=distill.alpha,
        temperature=distill.temperature,
    )
    if correction is not None:
        out.kd_sum = out.kd_sum + correction
    loss = distill.kd_weight * out.kd_sum + distill.ce_weight * out.ce_sum
    n = out.num_tokens  # the losses report the two masses as means over valid rows
    return LossSums(
        loss, out.kd_sum, out.ce_sum, out.teacher_mass_in_support * n, out.student_mass_in_teacher_topk * n
    )


def _sampled_reverse_kl(
    flat: Tensor, targets: Tensor, mask_p: Tensor, teacher: TeacherBatch, distill: DistillSection
) -> LossSums:
    """sampled_reverse_kl (losses.sampled_reverse_kl_sums): the KD field's value is Σ (log q − log p_T) over
    the target tokens, its gradient the policy gradient of reverse KL; no masses (no support is sent)."""
    if teacher.target_logprob is None:
        raise ValueError("loss='sampled_reverse_kl' needs the teacher's target_logprob (signal target_only)")
    kd, ce, _ = losses.sampled_reverse_kl_sums(
        flat, _pad_row(teacher.target_logprob), targets, mask_p, temperature=distill.temperature
    )
    return LossSums(distill.kd_weight * kd + distill.ce_weight * ce, kd, ce)


def _sampled_value_correction(log_w: Tensor, t_lp: Tensor | None, mask: Tensor, temperature: float) -> Tensor:
    """T² · Σ over masked rows of Σ_j w_j (log p_j − log w_j): the kernel's Σ w (log w − log q) plus this is
    Σ w (log p − log q), unbiased for KL(P‖Q). 0 when the teacher sent no log-probs at the draws."""
    if t_lp is None:
        return log_w.new_zeros(())
    w = log_w.exp()
    terms = torch.where(w > 0, w * (t_lp.to(w.dtype) - log_w), 0.0).sum(-1)
    return terms[mask.to(terms.device)].sum() * temperature**2


def student_top_ids(logits: Tensor, k: int, teacher_vocab: int | None = None) -> Tensor:
    """AT_IDS: the student's top-k ids (B, T-1, k) of rows 0..T-2, among ids the teacher has too."""
    rows = logits[:, :-1].detach()
    if teacher_vocab is not None and teacher_vocab < rows.shape[-1]:
        rows = rows[..., :teacher_vocab]
    return rows.topk(k, dim=-1).indices


def forward_backward_step(
    model: nn.Module, mb: MicroBatch, *, distill: DistillSection, scale: float, device: torch.device
) -> Tensor:
    """Forward one micro-batch, backward `loss_sum × scale`; returns the detached `LossSums` as a (5,) fp64
    tensor (NaN for the KD fields without a teacher)."""
    input_ids = mb.batch["input_ids"].to(device)
    mask = target_mask(mb.batch, mb.teacher).to(device)
    logits = model(input_ids=input_ids).logits
    answer = mb.teacher
    if mb.resolve is not None:  # AT_IDS: the teacher is asked about this forward's own top-k ids
        answer = mb.resolve(student_top_ids(logits, distill.top_k, mb.resolve.teacher_vocab))
    teacher = None if answer is None else answer.to(device)
    sums = loss_sums(logits, input_ids, mask, teacher, distill)
    (sums.loss * scale).backward()
    nan = torch.full_like(sums.loss, float("nan"))
    return torch.stack([nan if x is None else x.float() for x in sums]).detach().double().cpu()


def accumulate_gradients(
    model: nn.Module,
    micro: list[MicroBatch],
    *,
    distill: DistillSection,
    device: torch.device,
    dp_size: int = 1,
) -> tuple[Tensor, float]:
    """Backward every micro-batch so the gradients equal ∇ of the global token mean (see module docstring).

    Returns the local `LossSums` fields as a (5,) tensor (not yet reduced over ranks) and the global target
    count N.
    """
    local = sum(int(target_mask(mb.batch, mb.teacher).sum()) for mb in micro)
    n_tokens = float(all_reduce_sum(torch.tensor([local], dtype=torch.float64)).item())
    scale = dp_size / max(n_tokens, 1.0)  # × dp_size undoes FSDP's gradient averaging over the dp ranks
    sums = torch.zeros(len(LossSums._fields), dtype=torch.float64)
    for mb in micro:
        sums += forward_backward_step(model, mb, distill=distill, scale=scale, device=device)
    return sums, n_tokens
