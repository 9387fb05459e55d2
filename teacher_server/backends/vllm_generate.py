"""Generate on vLLM: sampling params from GenerateParams, and vLLM's streamed deltas as GenerateChunks.

One vLLM request per prompt (n samples each, vLLM parallel sampling: sample i of a seeded request uses
seed + i); outputs stream as RequestOutputKind.DELTA and become one GenerateChunk per token. Per-token
logprobs come from an engine started with logprobs_mode="processed_logprobs", i.e. after temperature:
log_softmax(logits / T), as the contract asks. Two combinations cannot be reported that way and answer
UNIMPLEMENTED instead of silently differing from the hf backend:
- greedy with temperature != 1: vLLM's greedy path reports logprobs at temperature 1;
- top_p < 1 or top_k > 0 (sampling): vLLM reports logprobs after the nucleus / top-k cut, renormalized
  over the kept tokens (greedy ignores both, so greedy with them is served).
Generation stops on exactly `stop_token_ids` (the model's EOS ids when empty; vLLM's own EOS check is off)
or after max_new_tokens, capped so that prompt + output fits max_seq_len.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import torch

from asymkd.contract import GenerateChunk
from teacher_server.backends.base import BackendError, GenerateParams, UnsupportedSignal
from teacher_server.backends.vllm_logprobs import sample_logprob_tensors

_FINISH_REASONS = ("stop", "length")


def check_generate(params: GenerateParams) -> None:
    """Refuse (UNIMPLEMENTED) what vLLM cannot report exactly; see the module docstring."""
    if params.greedy and params.temperature != 1.0:
        raise UnsupportedSignal(
            f"greedy with temperature {params.temperature:g}: vLLM reports greedy-decoding logprobs at "
            "temperature 1 only; use greedy without a temperature, or the hf backend"
        )
    if params.top_p < 1.0 and not params.greedy:
        raise UnsupportedSignal(
            f"top_p {params.top_p:g}: vLLM reports the logprobs of nucleus sampling renormalized over the "
            "nucleus, not log_softmax(logits / T); use top_p 1 on the vllm backend, or the hf backend"
        )
    if params.top_k > 0 and not params.greedy:
        raise UnsupportedSignal(
            f"top_k {params.top_k}: vLLM reports the logprobs of top-k sampling renormalized over the top "
            "k, not log_softmax(logits / T); use top_k 0 on the vllm backend, or the hf backend"
        )


def token_limits(prompts: list[torch.Tensor], max_new_tokens: int, max_seq_len: int) -> list[int]:
    """Per prompt: how many tokens it may generate (vLLM needs prompt + output <= max_model_len)."""
    limits = []
    for i, p in enumerate(prompts):
        room = max_seq_len - p.numel()
        if room < 1:
            raise ValueError(
                f"prompts[{i}]: {p.numel()} tokens leave no room to generate under max_seq_len {max_seq_len}"
            )
        limits.append(min(max_new_tokens, room))
    return limits


def sampling_params(params: GenerateParams, index: int, limit: int, stop_ids: tuple[int, ...]):
    """vLLM SamplingParams for prompt `index` (its seed offset keeps prompts' samples independent)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seed = None if params.seed is None else (params.seed + index * params.n) % 2**63
    return SamplingParams(
        n=params.n,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        seed=seed,
        max_tokens=limit,
        stop_token_ids=list(stop_ids),
        ignore_eos=True,  # stop on exactly stop_ids
        logprobs=params.top_k_logprobs,  # 0: only the sampled token's logprob
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        flat_logprobs=True,
    )


async def stream_generate(
    engine,
    prompts: list[torch.Tensor],
    params: GenerateParams,
    limits: list[int],
    stop_ids: tuple[int, ...],
    request_id: Callable[[], str],
) -> AsyncIterator[GenerateChunk]:
    """Run every prompt as its own vLLM request; yield their chunks as they come (interleaved)."""
    from vllm import TokensPrompt

    queue: asyncio.Queue = asyncio.Queue()

    async def one(index: int, prompt: torch.Tensor, limit: int) -> None:
        try:
            sp = sampling_params(params, index, limit, stop_ids)
            tokens = TokensPrompt(prompt_token_ids=prompt.tolist())
            async for out in engine.generate(tokens, sp, request_id()):
                for co in out.outputs:
                    for chunk in completion_chunks(index, co, params):
                        queue.put_nowait(chunk)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which re-raises it
            queue.put_nowait(e)

    tasks = [
        asyncio.create_task(one(i, p, lim)) for i, (p, lim) in enumerate(zip(prompts, limits, strict=True))
    ]
    try:
        for _ in tasks:  # each task ends with one None (or an exception)
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
    finally:
        for t in tasks:
            t.cancel()  # a consumer that stops early (client gone) aborts the vLLM requests
        await asyncio.gather(*tasks, return_exceptions=True)


def completion_chunks(index: int, co, params: GenerateParams) -> list[GenerateChunk]:
    """One vLLM CompletionOutput delta -> one GenerateChunk per new token (as the hf backend streams; a
    delta holds several tokens when the engine ran ahead of this consumer), the last one `finished` if the
    sample is. A finished delta without new tokens gives one empty finished chunk."""
    finished = co.finish_reason is not None
    if finished and co.finish_reason not in _FINISH_REASONS:
        raise BackendError(f"vLLM finished a sample with reason {co.finish_reason!r}")
    n, k, vd = len(co.token_ids), params.top_k_logprobs, params.value_dtype
    if n == 0:
        empty = torch.zeros(0, dtype=vd)
        return (
            [GenerateChunk(index, co.index, [], empty, finished=True, finish_reason=co.finish_reason)]
            if finished
            else []
        )
    try:
        ids, lps = sample_logprob_tensors(co.logprobs, list(co.token_ids), k)  # column 0: the sampled token
    except ValueError as e:
        raise BackendError(str(e)) from e
    top_ids, top_lps, tok_lps = ids[:, 1:].to(torch.int32), lps[:, 1:].to(vd), lps[:, 0].to(vd)
    last = n - 1
    return [
        GenerateChunk(
            prompt_index=index,
            sample_index=co.index,
            token_ids=[int(co.token_ids[t])],
            logprobs=tok_lps[t : t + 1],
            top_ids=top_ids[t : t + 1] if k > 0 else None,
            top_logprobs=top_lps[t : t + 1] if k > 0 else None,
            finished=finished and t == last,
            finish_reason=co.finish_reason if finished and t == last else "",
        )
        for t in range(n)
    ]
