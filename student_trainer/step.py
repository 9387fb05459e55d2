"""One optimizer step's math: the loss of a micro-batch, gradient accumulation normalized over the global batch,
AdamW and its schedule. The loop around it is trainer.py.

One optimizer step = `grad_accum_steps` micro-batches per rank. Loss normalization: every micro-batch's loss
is a *sum* over its target rows (loss_mask & teacher.valid); before any backward the step's target count is
summed over the micro-batches and all-reduced over ranks (N), and each micro-batch back-propagates
sum × dp_size / N. FSDP averages gradients over the dp ranks (÷ dp_size), so the accumulated gradient is
Σ_ranks Σ_micro ∇sum / N: exactly the gradient of the mean loss over all target tokens of the global batch,
however tokens are spread over micro-batches and ranks.
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

    Without a teacher the loss is CE. With one: kd_weight · KD + ce_weight · CE (losses.py: TOP_K through
    the fused kernel, FULL in chunks of `chunk_rows` valid rows, so no (B, T, V) tensor is built beyond the
    student's own logits).
    """
    b, t, v = logits.shape
    flat = logits.reshape(b * t, v)  # a view: row b·T + t predicts input_ids[b, t + 1]
    mask_p = _pad_row(mask, False)
    targets = _pad_row(input_ids[:, 1:])
    if teacher is None:
        ce = losses.ce_loss_sum(flat, targets, mask_p)
        return LossSums(ce, None, ce)
    if teacher.ids is not None:
        t_lp, t_ids, t_tail = teacher.logprobs, teacher.ids, teacher.tail_logprob
    else:
        t_lp, t_ids, t_tail = teacher.full, None, None
    out = losses.distill_loss(
        flat,
        _pad_row(t_lp),
        mask_p,
        teacher_ids=_pad_row(t_ids),
        teacher_tail=_pad_row(t_tail),
        targets=targets,
        chunk_rows=distill.chunk_rows or None,
        loss=distill.loss,
        beta=distill.beta,
        alpha=distill.alpha,
        temperature=distill.temperature,
    )
    loss = distill.kd_weight * out.kd_sum + distill.ce_weight * out.ce_sum
    n = out.num_tokens  # the losses report the two masses as means over valid rows
    return LossSums(
        loss, out.kd_sum, out.ce_sum, out.teacher_mass_in_support * n, out.student_mass_in_teacher_topk * n
    )


def forward_backward_step(
    model: nn.Module, mb: MicroBatch, *, distill: DistillSection, scale: float, device: torch.device
) -> Tensor:
    """Forward one micro-batch, backward `loss_sum × scale`; returns the detached `LossSums` as a (5,) fp64
    tensor (NaN for the KD fields without a teacher)."""
    input_ids = mb.batch["input_ids"].to(device)
    teacher = None if mb.teacher is None else mb.teacher.to(device)
    mask = target_mask(mb.batch, mb.teacher).to(device)
    logits = model(input_ids=input_ids).logits
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
