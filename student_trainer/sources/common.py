"""What every teacher source shares: the handshake on the teacher's facts, and the layout of its answers.

    top_k = negotiate(info, distill, teacher, student)      # raises TeacherCompatError; the top_k to ask for
    starts, has_target = score_from_rows(batch["loss_mask"])  # where the teacher starts scoring each row
    tb = scatter_scores(per_sequence_scores, batch["loss_mask"], top_k=k, vocab_size=V)   # -> TeacherBatch

Vocabulary handshake: the teacher's tokenizer hash must equal the student's and its logits width
(`vocab_size`) must equal the student's. Padded-vocab rule (`teacher.allow_padded_vocab`): widths may differ
when both cover every id the tokenizer can produce (`TeacherInfo.tokenizer_vocab_size`), as with Qwen
checkpoints padded to 151936 or 152064 columns. Ids that exist on one side only are ids the tokenizer never
produces; they count as probability 0 on the other side. Student wider (V_s > V_t): the losses put its extra
columns in the tail bucket (TOP_K) or give the teacher -inf there (FULL). Teacher wider (V_t > V_s): a source
asks for top_k + (V_t − V_s) ids (capped at max_top_k), keeps the first top_k real ones and folds the rest,
padded ids included, into tail_logprob (the K+1 classes still hold all the mass); FULL rows are cut to V_s
and renormalized; HIDDEN rows go through the teacher's own output layer, whose logits the loss cuts the same
way (teacher_head.py); SAMPLED draws of ids the student does not have are dropped (their weight goes to the
other draws). The packed row length must fit the teacher's max_seq_len.

Signals: every one of `distill.signal` must be on the teacher's list; hidden also needs its output layer
(GetInfo.output_layer), `teacher.data_plane: torch` needs the TORCH data plane, and top_k (TOP_K, AT_IDS) /
num_samples (SAMPLED) must not exceed max_top_k.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from asymkd.contract import DataPlane, SequenceScores, Signal, TeacherInfo
from student_trainer.config import DistillSection, TeacherSection
from student_trainer.sources.base import StudentSide, TeacherBatch


class TeacherCompatError(ValueError):
    """Teacher and student disagree (vocabulary, tokenizer, sequence length), or the teacher cannot give
    the requested signal."""


class TeacherUnreachableError(RuntimeError):
    """No teacher answered within the source's deadline (the message names the address and the last error)."""


class TeacherRowsError(RuntimeError):
    """A teacher answer with the wrong number of rows for its sequence."""


# ---------------------------------------------------------------------------------------------- handshake
def check_teacher_compat(
    info: TeacherInfo, *, vocab_size: int, tokenizer_hash: str, allow_padded_vocab: bool
) -> None:
    """Raise TeacherCompatError unless teacher and student agree on the vocabulary (module docstring)."""
    where = f"teacher {info.model!r} ({info.backend})"
    if info.tokenizer_hash != tokenizer_hash:
        raise TeacherCompatError(
            f"{where} has tokenizer hash {info.tokenizer_hash or '(none)'!r} but the student's is "
            f"{tokenizer_hash or '(none)'!r}: token-level KD needs the same tokenizer on both sides"
        )
    if info.vocab_size == vocab_size:
        return
    sizes = f"teacher vocab_size (logits width) {info.vocab_size} != student vocab_size {vocab_size}"
    tok = info.tokenizer_vocab_size
    covered = tok > 0 and min(info.vocab_size, vocab_size) >= tok
    if not allow_padded_vocab:
        hint = f"; both cover the tokenizer's {tok} ids: set teacher.allow_padded_vocab=true to accept it"
        raise TeacherCompatError(sizes + (hint if covered else ""))
    if not covered:
        raise TeacherCompatError(
            f"{sizes}, and the padded-vocab rule needs both to cover the tokenizer's ids "
            f"(tokenizer_vocab_size={tok or 'unknown'})"
        )


def wanted_signal(distill: DistillSection) -> Signal:
    return Signal[distill.signal.upper()]


def negotiate(
    info: TeacherInfo, distill: DistillSection, teacher: TeacherSection, student: StudentSide
) -> int:
    """The handshake on a teacher's facts: same vocabulary, the wanted signal on offer, rows that fit;
    returns the top_k to request (top_k, plus room for a wider teacher's padded ids, capped at max_top_k)."""
    check_teacher_compat(
        info,
        vocab_size=student.vocab_size,
        tokenizer_hash=student.tokenizer_hash,
        allow_padded_vocab=teacher.allow_padded_vocab,
    )
    wanted = wanted_signal(distill)
    if info.signals and wanted not in info.signals:
        raise TeacherCompatError(f"teacher {info.model!r} does not offer signal {wanted.name}")
    if info.max_seq_len and student.seq_len > info.max_seq_len:
        raise TeacherCompatError(
            f"data.seq_len={student.seq_len} exceeds the teacher's max_seq_len={info.max_seq_len}"
        )
    k = distill.top_k
    if wanted in (Signal.TOP_K, Signal.AT_IDS) and k > info.max_top_k:
        raise TeacherCompatError(f"distill.top_k={k} exceeds the teacher's max_top_k={info.max_top_k}")
    if wanted == Signal.SAMPLED and distill.num_samples > info.max_top_k:
        raise TeacherCompatError(
            f"distill.num_samples={distill.num_samples} exceeds the teacher's max_top_k={info.max_top_k}"
        )
    if wanted == Signal.HIDDEN and info.output_layer is None:
        raise TeacherCompatError(f"teacher {info.model!r} serves no output layer: the hidden signal needs it")
    if teacher.data_plane == "torch" and DataPlane.TORCH not in info.data_planes:
        raise TeacherCompatError(
            f"teacher {info.model!r} offers no torch data plane (teacher.data_plane=torch)"
        )
    if wanted != Signal.TOP_K:
        return k
    return min(k + max(info.vocab_size - student.vocab_size, 0), max(info.max_top_k, k))


# ------------------------------------------------------------------------------------------ rows <-> batch
def score_from_rows(loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T-1) loss mask -> (score_from (B,), has_target (B,)): the first target row of each packed row, so
    the teacher skips prompts; a row without targets gets T-2 (one row, result ignored)."""
    has_target = loss_mask.any(dim=1)
    first = loss_mask.to(torch.int8).argmax(dim=1)
    return torch.where(has_target, first, loss_mask.shape[1] - 1), has_target


def fit_teacher_vocab(s: SequenceScores, vocab_size: int, top_k: int) -> SequenceScores:
    """Drop teacher ids >= vocab_size (a wider, padded teacher vocab; see the module docstring)."""
    if s.full is not None and s.full.shape[-1] > vocab_size:
        s.full = torch.log_softmax(s.full[:, :vocab_size].float(), dim=-1)
    if s.counts is not None:  # SAMPLED: a draw the student cannot represent becomes padding
        outside = s.ids >= vocab_size
        if bool(outside.any()):
            s.ids, s.counts = s.ids.masked_fill(outside, -1), s.counts.masked_fill(outside, 0)
            s.logprobs = None if s.logprobs is None else s.logprobs.masked_fill(outside, float("-inf"))
        return s
    if s.ids is None or (s.ids.shape[1] == top_k and bool((s.ids < vocab_size).all())):
        return s
    real = s.ids < vocab_size
    keep = real & (real.cumsum(dim=1) <= top_k)
    short = keep.sum(dim=1) < top_k
    if bool(short.any()):
        raise TeacherCompatError(
            f"a teacher top-{s.ids.shape[1]} row holds fewer than {top_k} ids below the student's vocab_size "
            f"{vocab_size}; raise the teacher's --max-top-k or build the student with the teacher's vocab size"
        )
    rows = s.ids.shape[0]
    dropped = s.logprobs.masked_fill(keep, float("-inf"))
    tail = torch.cat([s.tail_logprob.unsqueeze(1), dropped], dim=1).logsumexp(dim=1)
    s.ids, s.logprobs = s.ids[keep].view(rows, top_k), s.logprobs[keep].view(rows, top_k)
    s.tail_logprob = tail
    return s


def _placeholders(first: SequenceScores, b: int, rows: int, top_k: int) -> TeacherBatch:
    """(B, T-1, ·) tensors holding the placeholder of an unscored row, for the fields `first` has. FULL and
    HIDDEN rows are left uninitialized (scatter_scores writes every row of them)."""
    out = TeacherBatch(valid=torch.zeros(b, rows, dtype=torch.bool))
    width = top_k if first.logprobs is None else first.logprobs.shape[1]  # k, m (AT_IDS, SAMPLED)
    if first.ids is not None or first.logprobs is not None:
        out.ids = torch.arange(width, dtype=torch.int64).expand(b, rows, width).clone()
        out.logprobs = torch.full((b, rows, width), -math.log(width))
    if first.tail_logprob is not None:
        out.tail_logprob = torch.full((b, rows), float("-inf"))
    if first.counts is not None:
        out.counts = torch.zeros(b, rows, width, dtype=torch.int64)
    if first.full is not None:
        out.full = torch.empty(b, rows, first.full.shape[-1])
    if first.hidden is not None:
        out.hidden = torch.empty(b, rows, first.hidden.shape[-1], dtype=first.hidden.dtype)
    if first.target_logprob is not None:
        out.target_logprob = torch.zeros(b, rows)
    return out


def _joined(parts: list[Tensor]) -> Tensor | None:
    """A (B, R, W) view of per-sequence (R, W) row blocks that lie one after the other in one contiguous tensor
    (the data plane's one tensor per request, split by sequence): no copy of FULL rows. None otherwise."""
    first = parts[0]
    base, step = first.storage_offset(), first.numel()
    for i, part in enumerate(parts):
        same = part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (
            same
            and part.is_contiguous()
            and part.shape == first.shape
            and part.storage_offset() == base + i * step
        ):
            return None
    return first.as_strided((len(parts), *first.shape), (step, *first.stride()), base)


def scatter_scores(
    scores: list[SequenceScores],
    loss_mask: Tensor,
    *,
    top_k: int,
    vocab_size: int,
    at_ids: Tensor | None = None,
) -> TeacherBatch:
    """Per-sequence results (rows score_from..T-2) -> (B, T-1, ·) tensors + valid. Unscored rows hold a
    well-formed placeholder (uniform over ids 0..k-1, no tail, no draws; -inf but column 0 for FULL; zeros
    for HIDDEN), never NaN. AT_IDS: `at_ids` (B, T-1, m) are the ids asked about (the student's)."""
    b, rows = loss_mask.shape
    score_from, has_target = score_from_rows(loss_mask)
    fits = [fit_teacher_vocab(s, vocab_size, top_k) for s in scores]
    out = _placeholders(fits[0], b, rows, top_k)
    if at_ids is not None:
        out.ids = at_ids.to("cpu", torch.int64)
    for i, s in enumerate(fits):
        if has_target[i] and s.num_rows != rows - int(score_from[i]):
            raise TeacherRowsError(
                f"sequence {i}: {s.num_rows} teacher rows for {rows - int(score_from[i])} requested"
            )
    whole = bool(has_target.all()) and not bool(score_from.any())  # every row scored from row 0
    for name in ("full", "hidden"):
        joined = (
            _joined([getattr(s, name) for s in fits]) if whole and getattr(out, name) is not None else None
        )
        if joined is not None and joined.shape[1] == rows:
            setattr(out, name, joined)
            fits = [dataclasses.replace(s, **{name: None}) for s in fits]
    for i, s in enumerate(fits):
        start = int(score_from[i]) if has_target[i] else rows
        if out.full is not None:
            out.full[i, :start] = float("-inf")
            out.full[i, :start, 0] = 0.0
        if out.hidden is not None:
            out.hidden[i, :start] = 0.0
        if start == rows:
            continue
        out.valid[i, start:] = True
        for name in ("ids", "logprobs", "tail_logprob", "target_logprob", "full", "hidden", "counts"):
            dst, src = getattr(out, name), getattr(s, name)
            if dst is not None and src is not None:
                dst[i, start:] = src
    return out
