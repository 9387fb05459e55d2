"""Teacher signals from raw logits, exactly: temperature, log-softmax, top-k with the exact tail mass.

Shared by every backend that can see logits (transformers directly; vLLM through hidden states + the
output layer). All math runs in float32 (float64 when the logits are float64) in row chunks, so at most
`chunk_rows × V` floats are live beyond the input.
"""

from __future__ import annotations

import torch

from teacher_server.backends.base import ScoreItem, ScoreParams, SeqScores, Signal

CHUNK_ROWS = 512


def log_softmax_at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(R, V) logits -> (R, V) log softmax(logits / T) in at least float32."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim=-1)


def topk_with_tail(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) log-probs -> ids (R, k) descending, their log-probs (R, k), tail log-mass (R,).

    The tail is log Σ_{v ∉ top-k} p_v computed as a masked logsumexp (not log(1 - Σ top-k), which loses all
    precision when the top-k holds nearly all the mass); it is -inf when k = V.
    """
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    rest = logprobs.scatter(-1, top_ids, float("-inf"))
    return top_ids, top_lp, torch.logsumexp(rest, dim=-1)


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
) -> SeqScores:
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
    return SeqScores(
        ids=res["ids"].to(torch.int32) if "ids" in res else None,
        logprobs=res["logprobs"].to(vd) if "logprobs" in res else None,
        tail_logprob=res["tail_logprob"].to(vd) if "tail_logprob" in res else None,
        target_logprob=res["target_logprob"].to(vd),
        full=res["full"].to(vd) if "full" in res else None,
        counts=res["counts"].to(torch.int32) if "counts" in res else None,
    )


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
    elif sig == Signal.AT_IDS:
        at = item.at_ids[rows].to(lp.device).long()
        parts["logprobs"] = lp.gather(-1, at)
    elif sig == Signal.SAMPLED:
        if generator is None:
            raise ValueError("SAMPLED needs a torch.Generator")
        parts["ids"], parts["counts"] = sample_counts(lp.cpu(), params.num_samples, generator)
    elif sig != Signal.TARGET_ONLY:
        raise ValueError(f"signal {sig!r} is not computed from logits")
    return parts
