"""The vLLM backend: vLLM's async engine in-process (tensor × pipeline parallel), token-id prompts.

    asymkd serve --backend vllm --model DIR --tensor-parallel-size 2 [--vllm.runner pooling|generate|both]

One vLLM engine runs one *runner*; `--vllm.runner` picks what this teacher can answer:

| runner   | Score signals                                                   | Generate |
|----------|-----------------------------------------------------------------|----------|
| pooling  | all (TOP_K, TARGET_ONLY, AT_IDS, SAMPLED, FULL, HIDDEN), exact  | no       |
| generate | TOP_K, TARGET_ONLY at temperature 1; tail derived from top-k    | yes      |
| both     | as pooling (Score uses the pooling engine)                      | yes      |

- pooling (default): vLLM returns each position's final (post-norm) hidden state (pooling task
  `token_embed`, pooling ALL, no activation); the teacher's output layer, loaded from the folder's
  safetensors, runs here in torch and scoring.py computes every signal from the logits exactly like the hf
  backend: temperature, exact tail (summed over the rest of the row), FULL rows. Needs the tokenizer files
  in the folder (vLLM's pooling runner loads them) and a floating-point output layer. Generate answers
  UNIMPLEMENTED.
- generate: TOP_K / TARGET_ONLY through vLLM `prompt_logprobs` (kept as tensors, see vllm_logprobs.py).
  vLLM's prompt logprobs are log_softmax(logits) at T=1 whatever the logprobs mode (prompt positions skip
  the sampler), so T != 1 answers UNIMPLEMENTED naming the pooling runner. The tail mass is derived as
  log(1 - Σ top-k p): as exact as the top-k in probability (~1e-6), but in log space only while the
  tail mass is not tiny (vllm_logprobs.py says why). FULL / HIDDEN / AT_IDS / SAMPLED are not offered.
  Generate uses vLLM sampling with logprobs_mode="processed_logprobs" so per-token logprobs are at the
  request temperature; greedy with T != 1 and top_p < 1 answer UNIMPLEMENTED (vLLM reports greedy logprobs
  at T=1 and nucleus logprobs renormalized over the nucleus; the contract wants log_softmax(logits / T)).
- both: one engine of each (2× weight memory; the memory options are split evenly between them).

Engine options come from ServeConfig (dtype, max_seq_len -> max_model_len, tensor/pipeline parallel
sizes, seed, max_top_k -> max_logprobs) and its `vllm` section (VLLMOptions: memory, enforce_eager,
cpu_offload_gb, quantization, distributed executor, multi-node flags, extra_engine_args verbatim).
CPU build: if VLLM_CPU_OMP_THREADS_BIND is unset it is derived from os.sched_getaffinity: the allowed cores
split into one contiguous group per local rank ("0-1" for TP=1 on 2 cores, "0|1" for TP=2); without it
vLLM's automatic NUMA binding refuses TP > NUMA nodes.
close() shuts every engine down (engine core and worker processes exit; tested with TP=2 after SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from asymkd.contract import GenerateChunk, SequenceScores, Signal, TeacherInfo
from teacher_server import scoring
from teacher_server.backends.base import (
    BackendError,
    GenerateParams,
    ScoreItem,
    ScoreParams,
    TeacherBackend,
    UnsupportedSignal,
)
from teacher_server.backends.common import TORCH_DTYPES, eos_token_ids, load_tokenizer, tokenizer_facts
from teacher_server.backends.vllm_generate import check_generate, stream_generate, token_limits
from teacher_server.backends.vllm_head import OutputHead
from teacher_server.backends.vllm_logprobs import (
    TENSOR_MARK,
    install_tensor_capture,
    prompt_logprob_tensors,
    scores_from_prompt_logprobs,
)
from teacher_server.config import ServeConfig
from teacher_server.models import DEFAULT_TEACHER

log = logging.getLogger("asymkd.teacher.vllm")

POOLING_SIGNALS = tuple(Signal)
PROMPT_LOGPROB_SIGNALS = (Signal.TOP_K, Signal.TARGET_ONLY)
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
GPU_DEFAULT_MEMORY_UTILIZATION = 0.9


def omp_threads_bind(num_ranks: int, cpus: list[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `num_ranks` workers on `cpus`: contiguous groups joined by '|'."""
    cpus = sorted(cpus)
    if num_ranks > len(cpus):  # oversubscribed: ranks share cores round-robin
        groups = [[cpus[i % len(cpus)]] for i in range(num_ranks)]
    else:
        per = len(cpus) // num_ranks
        groups = [cpus[i * per : (i + 1) * per] for i in range(num_ranks)]
    return "|".join(_cpu_ranges(g) for g in groups)


def _cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def resolve_model_dir(model: str) -> Path:
    """cfg.model -> an HF folder ("default" = the embedded teacher, converted once)."""
    if model == "default":
        from teacher_server.models import default_teacher_dir

        return default_teacher_dir()
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        raise ValueError(
            f"model: {model} is a GGUF file; the vllm backend serves HF folders (convert it first; "
            "`python -m teacher_server.models default` does so for the embedded teacher)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {path} is not an HF model folder (no config.json)")
    return path


def engine_kwargs(cfg: ServeConfig, folder: Path, runner: str, share: int, is_cpu: bool) -> dict:
    """AsyncEngineArgs keyword arguments for one engine of `runner` ("pooling" | "generate").

    `share` engines run in this process: memory options are divided among them.
    """
    o = cfg.vllm
    kw = {
        "model": str(folder),
        "dtype": cfg.dtype,
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "max_logprobs": cfg.max_top_k,
        "enforce_eager": o.enforce_eager,
        "cpu_offload_gb": o.cpu_offload_gb,
        "nnodes": o.nnodes,
        "node_rank": o.node_rank,
        "disable_log_stats": True,
    }
    optional = {
        "max_model_len": cfg.max_seq_len or None,
        "quantization": o.quantization,
        "distributed_executor_backend": o.distributed_executor_backend,
        "max_num_seqs": o.max_num_seqs,
        "max_num_batched_tokens": o.max_num_batched_tokens,
        "master_addr": o.master_addr,
        "master_port": o.master_port,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    kv_bytes = o.kv_cache_memory_bytes
    if kv_bytes is None and is_cpu and o.gpu_memory_utilization is None:
        kv_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    if kv_bytes is not None:
        kw["kv_cache_memory_bytes"] = kv_bytes // share
    kw["gpu_memory_utilization"] = (o.gpu_memory_utilization or GPU_DEFAULT_MEMORY_UTILIZATION) / share
    if runner == "pooling":
        from vllm.config import PoolerConfig

        # use_activation=False: without it the vectors come back normalized (useless for the output layer).
        pooler = PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False)
        kw.update(runner="pooling", pooler_config=pooler)
    else:
        kw.update(runner="generate", skip_tokenizer_init=True, logprobs_mode="processed_logprobs")
    kw.update(o.extra_engine_args)
    return kw


class VLLMBackend(TeacherBackend):
    """vLLM AsyncLLM engine(s) in this process. `info` is available after `await start()`."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.runner = cfg.vllm.runner
        self._engines: dict[str, object] = {}  # "pooling" / "generate" -> AsyncLLM
        self._building: list[Future] = []
        self._builder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vllm-build")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-head")
        self._head: OutputHead | None = None
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(cfg.seed)
        self._info: TeacherInfo | None = None

    @property
    def info(self) -> TeacherInfo:
        if self._info is None:
            raise RuntimeError("VLLMBackend.info is available after `await start()`")
        return self._info

    # ---- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the engine(s) (worker processes), load the output layer (pooling), warm up."""
        try:
            await self._start()
        except BaseException:
            await self.close()  # never leave engine processes behind a failed start
            raise

    async def _start(self) -> None:
        from vllm.platforms import current_platform

        folder = resolve_model_dir(self.cfg.model)
        is_cpu = current_platform.is_cpu()
        if is_cpu:
            self._configure_cpu_threads()
        install_tensor_capture()
        runners = ("pooling", "generate") if self.runner == "both" else (self.runner,)
        loop = asyncio.get_running_loop()
        # Two engines ("both") start together on CPU (the start is mostly child processes importing vLLM);
        # on GPUs one after the other, so that each engine's memory profiling sees the other's weights.
        for name in runners:
            kw = engine_kwargs(self.cfg, folder, name, len(runners), is_cpu)
            log.info("starting vLLM %s engine: %s", name, kw)
            self._building.append(self._builder.submit(self._build_engine, name, kw))
            if not is_cpu:
                await asyncio.wrap_future(self._building[-1], loop=loop)
        await asyncio.gather(*(asyncio.wrap_future(f, loop=loop) for f in self._building))
        if "pooling" in self._engines:
            device = self.cfg.vllm.head_device
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = TORCH_DTYPES[self.cfg.dtype]
            self._head = await loop.run_in_executor(
                self._executor, OutputHead.load, folder, dtype, torch.device(device)
            )
        self._info = self._make_info(folder, runners)
        if self.cfg.warmup:
            await self._warm_up()
        log.info(
            "vllm backend ready: %s (runner %s, signals %s)",
            self._info.model,
            self.runner,
            ", ".join(s.name for s in self._info.signals),
        )

    def _build_engine(self, name: str, kw: dict) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            args = AsyncEngineArgs(**kw)
        except TypeError as e:
            raise ValueError(f"vllm.extra_engine_args: {e}") from None
        self._engines[name] = AsyncLLM.from_engine_args(args)

    def _configure_cpu_threads(self) -> None:
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
            return
        ranks = self.cfg.tensor_parallel_size * self.cfg.pipeline_parallel_size // self.cfg.vllm.nnodes
        bind = omp_threads_bind(max(ranks, 1), sorted(os.sched_getaffinity(0)))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        log.info("VLLM_CPU_OMP_THREADS_BIND=%s (%d local rank(s))", bind, ranks)

    def _make_info(self, folder: Path, runners: tuple[str, ...]) -> TeacherInfo:
        from transformers import AutoConfig

        engine = next(iter(self._engines.values()))
        text_cfg = AutoConfig.from_pretrained(folder).get_text_config()
        vocab = self._head.vocab_size if self._head is not None else int(text_cfg.vocab_size)
        self.tokenizer = load_tokenizer(folder)  # Generate text prompts (the engines skip theirs)
        tok_len, tok_hash = tokenizer_facts(folder, None, self.tokenizer)
        notes = {
            "pooling": "Score: every signal exact via hidden states + output layer; no Generate",
            "generate": "Score: TOP_K/TARGET_ONLY at temperature 1 only, tail derived from the top-k "
            "(every signal: start with --vllm.runner pooling or both); Generate",
            "both": "Score via hidden states (exact, every signal); Generate via vLLM sampling",
        }
        return TeacherInfo(
            model=DEFAULT_TEACHER if self.cfg.model == "default" else self.cfg.model,
            backend="vllm",
            vocab_size=vocab,
            hidden_size=int(text_cfg.hidden_size),
            max_seq_len=int(engine.model_config.max_model_len),
            max_top_k=min(self.cfg.max_top_k, vocab),
            tokenizer_hash=tok_hash,
            dtype=self.cfg.dtype,
            signals=POOLING_SIGNALS if "pooling" in runners else PROMPT_LOGPROB_SIGNALS,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            pipeline_parallel_size=self.cfg.pipeline_parallel_size,
            eos_token_ids=eos_token_ids([_generation_config(folder), text_cfg]),
            tokenizer_vocab_size=tok_len or vocab,
            note=notes[self.runner],
        )

    async def _warm_up(self) -> None:
        ids = torch.tensor([0, 1, 2, 3], dtype=torch.long) % self._info.vocab_size
        await self.score([ScoreItem(ids)], ScoreParams(signal=Signal.TOP_K, top_k=1))
        if "generate" in self._engines:
            async for _ in self.generate([ids], GenerateParams(max_new_tokens=2, greedy=True)):
                pass

    async def close(self) -> None:
        """Shut every engine down (engine core + worker processes); safe to call more than once."""
        for fut in self._building:  # a start cancelled mid-build: let the build finish, then stop it
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        self._building = []
        engines, self._engines = self._engines, {}
        for name, engine in engines.items():
            log.info("shutting down the vLLM %s engine", name)
            handler = getattr(engine, "output_handler", None)
            engine.shutdown()  # engine core + workers: SIGTERM, then vLLM kills what is left after 5 s
            if isinstance(handler, asyncio.Task):  # cancelled by shutdown(); let it finish on this loop
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(handler, 5)
        self._builder.shutdown(wait=False)
        self._executor.shutdown(wait=False)
        self._head = None

    # ---- scoring ---------------------------------------------------------------------------------------

    async def score(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        """One SequenceScores per item, in order; the items run as concurrent engine requests."""
        self.info  # noqa: B018  (raises before start)
        if "pooling" in self._engines:
            return await self._score_pooling(items, params)
        return await self._score_prompt_logprobs(items, params)

    async def _score_pooling(self, items: list[ScoreItem], params: ScoreParams) -> list[SequenceScores]:
        hidden = await asyncio.gather(*(self._hidden_states(it.token_ids) for it in items))
        seed = (params.seed or self._fresh_seed()) if params.signal == Signal.SAMPLED else 0
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._head_scores, hidden, items, params, seed)

    async def _hidden_states(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(L,) ids -> (L, H) final hidden states from the pooling engine."""
        from vllm import PoolingParams, TokensPrompt

        engine = self._engines["pooling"]
        prompt = TokensPrompt(prompt_token_ids=token_ids.tolist())
        out = await _last(engine.encode(prompt, PoolingParams(task="token_embed"), self._request_id()))
        if out is None or not out.finished:
            raise BackendError("vLLM pooling request ended without a result")
        return out.outputs.data

    def _head_scores(
        self, hidden: list[torch.Tensor], items: list[ScoreItem], params: ScoreParams, seed: int
    ) -> list[SequenceScores]:
        sampled = params.signal == Signal.SAMPLED
        with torch.inference_mode():
            return [
                self._head.item_scores(h, it, params, scoring.item_generator(it, seed) if sampled else None)
                for h, it in zip(hidden, items, strict=True)
            ]

    async def _score_prompt_logprobs(
        self, items: list[ScoreItem], params: ScoreParams
    ) -> list[SequenceScores]:
        if params.signal not in PROMPT_LOGPROB_SIGNALS:
            raise UnsupportedSignal(
                f"signal {params.signal.name} needs the final hidden states: start the vllm backend with "
                "--vllm.runner pooling (or both)"
            )
        if params.temperature != 1.0:
            raise UnsupportedSignal(
                f"temperature {params.temperature:g}: vLLM's prompt logprobs are at temperature 1 (prompt "
                "positions skip the sampler's temperature); start the vllm backend with --vllm.runner "
                "pooling (or both) for exact scores at any temperature"
            )
        k = params.top_k if params.signal == Signal.TOP_K else 0
        outs = await asyncio.gather(*(self._prompt_logprobs(it.token_ids, k) for it in items))
        loop = asyncio.get_running_loop()  # cheap slicing when captured as tensors; list conversion if not
        return await loop.run_in_executor(self._executor, self._logprob_scores, outs, items, params, k)

    def _logprob_scores(
        self, outs: list, items: list[ScoreItem], params: ScoreParams, k: int
    ) -> list[SequenceScores]:
        vocab = self.info.vocab_size
        return [
            scores_from_prompt_logprobs(*prompt_logprob_tensors(plp, k + 1), it, params, vocab)
            for plp, it in zip(outs, items, strict=True)
        ]

    async def _prompt_logprobs(self, token_ids: torch.Tensor, k: int):
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=k,
            detokenize=False,
            flat_logprobs=True,
            extra_args={TENSOR_MARK: True},
        )
        prompt = TokensPrompt(prompt_token_ids=token_ids.tolist())
        out = await _last(self._engines["generate"].generate(prompt, sp, self._request_id()))
        if out is None or out.prompt_logprobs is None:
            raise BackendError("vLLM returned no prompt logprobs")
        return out.prompt_logprobs

    def _request_id(self) -> str:
        return f"asymkd-{os.getpid()}-{next(self._ids)}"

    def _fresh_seed(self) -> int:
        return int(torch.randint(1, 2**62, (1,), generator=self._seeds))

    # ---- generation ------------------------------------------------------------------------------------

    async def generate(
        self, prompts: list[torch.Tensor], params: GenerateParams
    ) -> AsyncIterator[GenerateChunk]:
        """Stream chunks as vLLM produces tokens (one vLLM request per prompt, n samples each)."""
        self.info  # noqa: B018  (raises before start)
        if "generate" not in self._engines:
            raise UnsupportedSignal(
                "Generate: this vllm teacher runs the pooling runner; start it with "
                "--vllm.runner generate (or both)"
            )
        check_generate(params)
        limits = token_limits(prompts, params.max_new_tokens, self.info.max_seq_len)
        stop_ids = params.stop_token_ids or self.info.eos_token_ids
        engine = self._engines["generate"]
        async for chunk in stream_generate(engine, prompts, params, limits, stop_ids, self._request_id):
            yield chunk


async def _last(outputs: AsyncIterator):
    """The final item of an engine output stream (None if it yields nothing)."""
    out = None
    async for out in outputs:  # noqa: B007  (only the last one is kept)
        pass
    return out


def _generation_config(folder: Path):
    """The folder's GenerationConfig, or None without a generation_config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return None
