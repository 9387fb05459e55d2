"""vLLM logprobs as tensors, and the TOP_K / TARGET_ONLY signals built from vLLM's prompt logprobs.

vLLM computes prompt logprobs on its worker as tensors: ids and logprobs, both (N, k+1) for a prompt of
N+1 tokens, column 0 the actual next token and columns 1..k the top-k in descending order. In the
front-end process its `LogprobsProcessor` then turns them into a Python dict per position (or, with
`flat_logprobs`, Python list entries per position and rank): L×(k+1) Python objects per sequence, the known
slow path of `prompt_logprobs`. `install_tensor_capture()` wraps two methods of that class so that a request
whose SamplingParams.extra_args holds `TENSOR_MARK` keeps the tensors instead (no per-element Python work
at all; other requests are untouched). If the installed vLLM lacks these internals the capture is not
installed and the flat form is used (its lists become tensors with one `torch.tensor` call each).

Tail mass on this route is *derived*: vLLM returns only the top-k, so tail = log(1 - Σ_topk p) computed as
log(-expm1(logsumexp(top-k logprobs))) in float64. Its absolute error in probability is that of the top-k
probabilities themselves (vLLM's fp32 log-softmax; measured within 1.3e-6 of the hf backend in the tests),
so the log-tail is within 1e-4 of the exact value only while the tail mass is ≳ 1e-2; for peaked rows
(mass ~1e-5) it was off by up to 0.04 in the tests, and by more for smaller masses. Where rounding leaves no
mass at all, the tail is clamped to the smallest float32 mass (derived_tail), never -inf. The pooling
runner computes the tail exactly (summed over the rest of the full row, scoring.topk_with_tail).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from asymkd.contract import SequenceScores, Signal
from teacher_server.backends.base import ScoreItem, ScoreParams

log = logging.getLogger("asymkd.teacher.vllm")

TENSOR_MARK = "asymkd_prompt_logprob_tensors"
_installed: bool | None = None


def install_tensor_capture() -> bool:
    """Make marked requests keep vLLM's prompt-logprob tensors; True when installed (idempotent)."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        from vllm.logprobs import FlatLogprobs
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        _installed = False
        return False
    if not (
        hasattr(LogprobsProcessor, "from_new_request")
        and hasattr(LogprobsProcessor, "_update_prompt_logprobs")
    ):
        log.warning("this vLLM has no LogprobsProcessor hooks: prompt logprobs take the flat-list path")
        _installed = False
        return False

    @dataclass
    class TensorPromptLogprobs(FlatLogprobs):
        """Prompt logprobs kept as the (ids, logprobs) tensor chunks vLLM delivered."""

        chunks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    orig_new = LogprobsProcessor.from_new_request.__func__
    orig_update = LogprobsProcessor._update_prompt_logprobs

    def from_new_request(cls, tokenizer, request):
        proc = orig_new(cls, tokenizer, request)
        sp = request.sampling_params
        if proc.prompt_logprobs is not None and sp is not None and (sp.extra_args or {}).get(TENSOR_MARK):
            proc.prompt_logprobs = TensorPromptLogprobs()
            proc.prompt_logprobs.append(None)  # vLLM's convention: position 0 has no logprobs
        return proc

    def _update_prompt_logprobs(self, tensors):
        if isinstance(self.prompt_logprobs, TensorPromptLogprobs):
            ids, logprobs, *_ = tensors
            self.prompt_logprobs.chunks.append((ids, logprobs))
            return None
        return orig_update(self, tensors)

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
    _installed = True
    return True


def prompt_logprob_tensors(prompt_logprobs, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A request's prompt logprobs -> ids (N, width) int64 and logprobs (N, width) float32.

    `width` = k + 1 (the actual token, then the top-k). Accepts the captured tensors or a FlatLogprobs.
    """
    chunks = getattr(prompt_logprobs, "chunks", None)
    if chunks:
        ids = torch.cat([c[0] for c in chunks]) if len(chunks) > 1 else chunks[0][0]
        lps = torch.cat([c[1] for c in chunks]) if len(chunks) > 1 else chunks[0][1]
        return ids[:, :width].long(), lps[:, :width].float()
    if not hasattr(prompt_logprobs, "start_indices"):
        raise TypeError(f"expected FlatLogprobs from vLLM, got {type(prompt_logprobs).__name__}")
    ids = torch.tensor(prompt_logprobs.token_ids, dtype=torch.long).view(-1, width)
    lps = torch.tensor(prompt_logprobs.logprobs, dtype=torch.float32).view(-1, width)
    return ids, lps


def sample_logprob_tensors(flat, sampled: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated-token logprobs -> ids (n, 1 + k) int64 and logprobs (n, 1 + k) float32 for the last
    n = len(sampled) positions of a FlatLogprobs: column 0 the sampled token, then the top-k by rank.

    A position normally holds 1 + k entries (the sampled token first), but vLLM may hand over a position
    without its sampled entry when that token is among the top-k (seen with delta outputs), so each
    position is read by its own start/end index: the sampled token's logprob is then found among the top-k.
    Anything else (too few entries, a sampled token that is nowhere) is a ValueError, never a misaligned row.
    """
    n = len(sampled)
    starts, ends = (
        flat.start_indices[len(flat.start_indices) - n :],
        flat.end_indices[len(flat.end_indices) - n :],
    )
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for t, (a, b) in enumerate(zip(starts, ends, strict=True)):
        tok, lp = flat.token_ids[a:b], flat.logprobs[a:b]
        top = slice(1, None) if b - a == 1 + k else slice(None)
        if len(tok[top]) != k:
            raise ValueError(f"vLLM gave {b - a} logprobs for a sampled position, expected {1 + k} (or {k})")
        own = 0 if b - a == 1 + k else next((i for i, x in enumerate(tok) if x == sampled[t]), None)
        if own is None or tok[own] != sampled[t]:
            raise ValueError(f"vLLM's logprobs of position {t} do not include the sampled token {sampled[t]}")
        ids.append([sampled[t], *tok[top]])
        lps.append([lp[own], *lp[top]])
    shape = (n, 1 + k)  # one tensor each, not one per position (a per-token path)
    return torch.tensor(ids, dtype=torch.long).view(shape), torch.tensor(lps, dtype=torch.float32).view(shape)


# The smallest mass a float32 probability carries as a normal number: exp() of the clamped tail stays > 0
# in float32, so a loss that takes log(p) or divides by p never sees -inf or 0 from the tail.
_MIN_TAIL_LOGPROB = math.log(torch.finfo(torch.float32).tiny)  # ≈ -87.34


def derived_tail(top_logprobs: torch.Tensor) -> torch.Tensor:
    """(R, k) top-k logprobs -> (R,) float64 log of the mass outside the top-k, log(1 - Σ exp(top)).

    Computed in float64 from the log-probs as log(-expm1(logsumexp(top))): no `1 - Σp` cancellation, so a
    small tail keeps its digits. vLLM's fp32 log-softmax can still leave the top-k holding all the mass (a
    top-1 log-prob that rounds to 0.0, or Σp rounded to just over 1), where the tail would be log(0) = -inf
    and reverse KL or JSD at β=1 (which weigh log(teacher)) would make the loss +inf and the gradients NaN.
    There, and wherever the tail is below it, the tail is clamped to the smallest mass float32 carries as a
    normal number, log(finfo(float32).tiny) ≈ -87.34: rounding has lost the true tail (at most ~6e-8 after an
    fp32 log-prob of 0.0), and this is the least mass a finite float32 loss can be computed from.
    """
    lse = torch.logsumexp(top_logprobs.double(), dim=-1)
    mass = -torch.expm1(lse)  # 1 - Σ p, accurate when Σ p is close to 1; <= 0 when rounding ate the tail
    return torch.log(mass.clamp_min(math.exp(_MIN_TAIL_LOGPROB)))


def scores_from_prompt_logprobs(
    ids: torch.Tensor, logprobs: torch.Tensor, item: ScoreItem, params: ScoreParams, vocab_size: int
) -> SequenceScores:
    """TOP_K / TARGET_ONLY for one item from its (L-1, k+1) prompt-logprob tensors (row t = our row t)."""
    rows = slice(item.score_from, None)
    vd = params.value_dtype
    out = SequenceScores(target_logprob=logprobs[rows, 0].to(vd))
    if params.signal == Signal.TOP_K:
        k = params.top_k
        top = logprobs[rows, 1 : k + 1]
        out.ids = ids[rows, 1 : k + 1].to(torch.int32)
        out.logprobs = top.to(vd)
        tail = derived_tail(top) if k < vocab_size else torch.full((top.shape[0],), float("-inf"))
        out.tail_logprob = tail.to(vd)
    return out
