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
and renormalized. The packed row length must fit the teacher's max_seq_len.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from asymkd.contract import SequenceScores, Signal, TeacherInfo
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
    if wanted == Signal.TOP_K and k > info.max_top_k:
        raise TeacherCompatError(f"distill.top_k={k} exceeds the teacher's max_top_k={info.max_top_k}")
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


def scatter_scores(
    scores: list[SequenceScores], loss_mask: Tensor, *, top_k: int, vocab_size: int
) -> TeacherBatch:
    """Per-sequence results (rows score_from..T-2) -> (B, T-1, ·) tensors + valid. Unscored rows hold a
    well-formed placeholder (uniform over ids 0..k-1, no tail; -inf but column 0 for FULL), never NaN."""
    b, rows = loss_mask.shape
    score_from, has_target = score_from_rows(loss_mask)
    fits = [fit_teacher_vocab(s, vocab_size, top_k) for s in scores]
    out = TeacherBatch(valid=torch.zeros(b, rows, dtype=torch.bool))
    first = fits[0]
    if first.ids is not None:
        out.ids = torch.arange(top_k, dtype=torch.int64).expand(b, rows, top_k).clone()
        out.logprobs = torch.full((b, rows, top_k), -math.log(top_k))
        out.tail_logprob = torch.full((b, rows), float("-inf"))
    if first.full is not None:
        out.full = torch.full((b, rows, first.full.shape[-1]), float("-inf"))
        out.full[..., 0] = 0.0
    if first.target_logprob is not None:
        out.target_logprob = torch.zeros(b, rows)
    for i, s in enumerate(fits):
        if not has_target[i]:
            continue
        start = int(score_from[i])
        if s.num_rows != rows - start:
            raise TeacherRowsError(f"sequence {i}: {s.num_rows} teacher rows for {rows - start} requested")
        out.valid[i, start:] = True
        for name in ("ids", "logprobs", "tail_logprob", "target_logprob", "full"):
            dst, src = getattr(out, name), getattr(s, name)
            if dst is not None and src is not None:
                dst[i, start:] = src
    return out
