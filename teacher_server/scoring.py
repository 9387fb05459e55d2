"""Teacher signals from raw logits, exactly: temperature, log-softmax, top-k with the exact tail mass.

Shared by every backend that can see logits (transformers directly; vLLM through hidden states + the
output layer):

    out = scores_from_hidden(rows, item, params, head_logits, item_generator(item, seed))

All math runs in float32 (float64 when the logits are float64) in row chunks, so at most
`CHUNK_ROWS × V` floats are live beyond the input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from asymkd.contract import SequenceScores, Signal
from teacher_server.backends.base import ScoreItem, ScoreParams

CHUNK_ROWS = 512
# tail_logprob sums exp(log-probs) through one scratch buffer of at most this size: a fresh (R, V) temporary
# (100 MB at 512 × 49k) is mmap'd and page-faulted on every call, which costs more than the exp and the sum;
# 16 MiB stays under glibc's largest mmap threshold (32 MiB), so the buffer's pages are reused.
_TAIL_BLOCK_BYTES = 16 << 20


def log_softmax_at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R, V) logits -> (R, V) log softmax(logits / T) in at least float32."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def topk_with_tail(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) log-probs -> ids (R, k) descending, their log-probs (R, k), tail log-mass (R,).

    The tail is log Σ_{v ∉ top-k} p_v summed over the rest (not log(1 - Σ top-k), which loses all precision
    when the top-k holds nearly all the mass); it is -inf when k = V.
    """
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    return top_ids, top_lp, tail_logprob(logprobs, top_ids)


def tail_logprob(logprobs: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(R, V) log-probs, (R, k) ids -> (R,) log Σ_{v ∉ exclude} p_v, as exact as a masked logsumexp.

    The log-probs are normalized (every p_v <= 1), so the mass is a plain Σ exp(log p_v) over the rest,
    summed in row blocks through one scratch buffer. That sum is exact unless terms underflow: the terms
    below finfo.tiny add up to at most V × tiny, which is below eps × mass while the mass stays above
    V × tiny / eps (~5e-27 for float32 at V = 49k). Rows under that floor (the rest has underflowed, or
    k = V) take the masked logsumexp, which shifts by the row's maximum first.
    """
    rows, vocab = logprobs.shape
    mass = logprobs.new_empty(rows)
    block = max(1, _TAIL_BLOCK_BYTES // max(vocab * logprobs.element_size(), 1))
    scratch = logprobs.new_empty(min(block, rows), vocab)
    for a in range(0, rows, block):
        b = min(a + block, rows)
        part = scratch[: b - a]
        torch.exp(logprobs[a:b], out=part)
        part.scatter_(-1, exclude[a:b], 0.0)
        torch.sum(part, dim=-1, out=mass[a:b])
    tail = mass.log()
    info = torch.finfo(logprobs.dtype)
    low = (mass < vocab * info.tiny / info.eps).nonzero()[:, 0]
    if low.numel():
        rest = logprobs[low].scatter(-1, exclude[low], float("-inf"))
        tail[low] = torch.logsumexp(rest, dim=-1)
    return tail


def sample_counts(
    logprobs: torch.Tensor, num_samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """RS-KD targets: draw `num_samples` ids per row from exp(logprobs).

    Returns ids (R, m) and counts (R, m): the distinct drawn ids in ascending order, padded with id -1 /
    count 0; counts / num_samples is an unbiased estimate of the teacher distribution.
    """
    probs = logprobs.float().exp()
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (R, m)
    draws, _ = draws.sort(dim=-1)
    is_new = torch.ones_like(draws, dtype=torch.bool)
    is_new[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = is_new.cumsum(-1) - 1  # index of each draw's distinct id within its row
    ids = torch.full_like(draws, -1)
    ids.scatter_(-1, slot, draws)
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    return ids, counts


def scores_from_logits(
    logits: torch.Tensor,
    item: ScoreItem,
    params: ScoreParams,
    generator: torch.Generator | None = None,
) -> SequenceScores:
    """Teacher signal for one sequence from its (R, V) logits rows (row r predicts item.targets[r])."""
    targets = item.targets.to(logits.device)
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        lp = log_softmax_at_temperature(logits[rows], params.temperature)
        parts = _signal_parts(lp, targets[rows], item, rows, params, generator)
        for name, t in parts.items():
            out.setdefault(name, []).append(t)
    vd = params.value_dtype
    res = {n: torch.cat(ts).cpu() for n, ts in out.items()}
    return SequenceScores(
        ids=res["ids"].to(torch.int32) if "ids" in res else None,
        logprobs=res["logprobs"].to(vd) if "logprobs" in res else None,
        tail_logprob=res["tail_logprob"].to(vd) if "tail_logprob" in res else None,
        target_logprob=res["target_logprob"].to(vd),
        full=res["full"].to(vd) if "full" in res else None,
        counts=res["counts"].to(torch.int32) if "counts" in res else None,
    )


def scores_from_hidden(
    hidden: torch.Tensor,
    item: ScoreItem,
    params: ScoreParams,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None = None,
) -> SequenceScores:
    """Signal for one item from its (R, H) final hidden rows (row r predicts item.targets[r]).

    `logits_fn` is the output layer, (N, H) -> (N, V); it runs on CHUNK_ROWS rows at a time, so at most
    CHUNK_ROWS × V logits are live. HIDDEN returns the rows themselves and nothing else: the output layer
    does not run at all (the student applies it, from GetOutputLayer).
    """
    if params.signal == Signal.HIDDEN:
        return SequenceScores(hidden=hidden.to(params.value_dtype).cpu())
    parts = []
    for a in range(0, hidden.shape[0], CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, hidden.shape[0])
        logits = logits_fn(hidden[a:b])
        parts.append(scores_from_logits(logits, row_slice(item, a, b), params, generator))
    return parts[0] if len(parts) == 1 else concat_scores(parts)


def row_slice(item: ScoreItem, a: int, b: int) -> ScoreItem:
    """The item restricted to its returned rows [a, b) (row indices relative to score_from)."""
    sf = item.score_from
    at = item.at_ids[a:b] if item.at_ids is not None else None
    return ScoreItem(token_ids=item.token_ids[: sf + b + 1], score_from=sf + a, at_ids=at)


def concat_scores(parts: list[SequenceScores]) -> SequenceScores:
    """Row-wise concatenation of the SequenceScores of consecutive row ranges of one sequence."""
    names = parts[0].tensors().keys()
    return SequenceScores(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})


def item_generator(item: ScoreItem, base_seed: int) -> torch.Generator:
    """SAMPLED's generator for one item: the draws depend only on (seed, sequence, score_from), not on what
    shares the batch, so every backend and batch split draws the same ids."""
    h = hashlib.blake2b(digest_size=8)
    h.update(base_seed.to_bytes(8, "little", signed=False))
    h.update(item.token_ids.to(device="cpu", dtype=torch.int64).numpy().tobytes())
    h.update(item.score_from.to_bytes(4, "little"))
    return torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1)


def _signal_parts(
    lp: torch.Tensor,
    targets: torch.Tensor,
    item: ScoreItem,
    rows: slice,
    params: ScoreParams,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    parts = {"target_logprob": lp.gather(-1, targets.long()[:, None])[:, 0]}
    sig = params.signal
    if sig == Signal.TOP_K:
        parts["ids"], parts["logprobs"], parts["tail_logprob"] = topk_with_tail(lp, params.top_k)
    elif sig == Signal.FULL:
        parts["full"] = lp
    elif sig == Signal.AT_IDS:  # the caller's ids + the exact mass outside them: a K+1-class distribution
        at = item.at_ids[rows].to(lp.device).long()
        parts["logprobs"] = lp.gather(-1, at)
        parts["tail_logprob"] = tail_logprob(lp, at)
    elif sig == Signal.SAMPLED:
        if generator is None:
            raise ValueError("SAMPLED needs a torch.Generator")
        ids, parts["counts"] = sample_counts(lp.cpu(), params.num_samples, generator)
        at = ids.clamp(min=0).to(lp.device)
        parts["ids"] = ids
        # the teacher's log-probs at the drawn ids make the student's KL estimate unbiased in value too
        parts["logprobs"] = lp.gather(-1, at).masked_fill(ids.to(lp.device) < 0, float("-inf"))
    elif sig != Signal.TARGET_ONLY:
        raise ValueError(f"signal {sig!r} is not computed from logits")
    return parts
