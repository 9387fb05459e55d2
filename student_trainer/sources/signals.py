"""The request side of every signal, shared by the live feed and the in-process teacher.

    query = build_query(batch, distill, top_k, encoding=IdEncoding.PACKED_IDS, at_ids=ids)   # a Score request
    params = score_params(distill, top_k)                  # the same request as engine parameters (in process)
    at = at_ids_per_sequence(ids, batch["loss_mask"])      # AT_IDS: (B, T-1, m) -> one (R_i, m) per row
    encoding = id_encoding(info, distill)                  # packed ids when asked for and offered

Every packed row is scored from its first target row (common.score_from_rows), whatever the signal: TOP_K
asks for top_k (+ room for a wider teacher's padded ids), SAMPLED for `num_samples` draws with
`sample_seed`, AT_IDS for the student's ids of the scored rows, FULL / HIDDEN for whole rows. Values travel
in `distill.value_dtype`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from asymkd.contract import IdEncoding, Signal, TeacherInfo
from asymkd.wire import ScoreQuery
from student_trainer.config import DistillSection
from student_trainer.sources.common import score_from_rows, wanted_signal
from teacher_server.backends.base import ScoreItem, ScoreParams


def id_encoding(info: TeacherInfo, distill: DistillSection) -> IdEncoding:
    """PACKED_IDS when `distill.pack_ids` and the teacher offers it, else INT32_IDS."""
    packed = distill.pack_ids and IdEncoding.PACKED_IDS in info.id_encodings
    return IdEncoding.PACKED_IDS if packed else IdEncoding.INT32_IDS


def at_ids_per_sequence(ids: Tensor, loss_mask: Tensor) -> list[Tensor]:
    """The student's ids (B, T-1, m) of the rows each packed row is scored on: one (R_i, m) per row."""
    score_from, _ = score_from_rows(loss_mask)
    ids = ids.to("cpu")
    return [ids[i, int(start) :] for i, start in enumerate(score_from.tolist())]


def build_query(
    batch: dict,
    distill: DistillSection,
    top_k: int,
    *,
    encoding: IdEncoding = IdEncoding.INT32_IDS,
    at_ids: Tensor | None = None,
    session: str = "",
) -> ScoreQuery:
    """A batch as one Score request: every packed row, scored from its first target row."""
    score_from, _ = score_from_rows(batch["loss_mask"])
    signal = wanted_signal(distill)
    return ScoreQuery(
        seqs=list(batch["input_ids"]),
        score_from=score_from.tolist(),
        signal=distill.signal,
        top_k=top_k,
        temperature=distill.temperature,
        value_dtype=distill.value_dtype,
        at_ids=None if at_ids is None else at_ids_per_sequence(at_ids, batch["loss_mask"]),
        num_samples=distill.num_samples if signal == Signal.SAMPLED else 0,
        seed=distill.sample_seed if signal == Signal.SAMPLED else 0,
        id_encoding=encoding,
        data_plane_session=session,
    )


def score_items(batch: dict, at_ids: Tensor | None = None) -> list[ScoreItem]:
    """The engine items of a batch (the in-process teacher's request)."""
    score_from, _ = score_from_rows(batch["loss_mask"])
    per_row = [None] * len(score_from) if at_ids is None else at_ids_per_sequence(at_ids, batch["loss_mask"])
    return [
        ScoreItem(token_ids=ids.long(), score_from=int(start), at_ids=None if at is None else at.long())
        for ids, start, at in zip(batch["input_ids"], score_from.tolist(), per_row, strict=True)
    ]


def score_params(distill: DistillSection, top_k: int) -> ScoreParams:
    """The request's engine parameters (what the server's validation would make of build_query's request)."""
    signal = wanted_signal(distill)
    sampled = signal == Signal.SAMPLED
    return ScoreParams(
        signal=signal,
        top_k=top_k if signal == Signal.TOP_K else 0,
        temperature=distill.temperature,
        value_dtype=getattr(torch, distill.value_dtype),
        num_samples=distill.num_samples if sampled else 0,
        seed=distill.sample_seed if sampled else 0,
    )


def scored_rows(loss_mask: Tensor) -> Tensor:
    """(B, T-1) bool: the rows a teacher scores (from each packed row's first target row on): the `valid` of
    a TeacherBatch known before the teacher answers (AT_IDS)."""
    score_from, has_target = score_from_rows(loss_mask)
    cols = torch.arange(loss_mask.shape[1])
    return (cols[None, :] >= score_from[:, None]) & has_target[:, None]
