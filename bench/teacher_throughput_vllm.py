"""vLLM teacher throughput: the asymkd service vs vLLM's own in-process `prompt_logprobs`, TP=1 and TP=2.

    python bench/teacher_throughput_vllm.py --quick                 # tiny model, smoke run
    python bench/teacher_throughput_vllm.py                         # 58M Llama (49k vocab), top-k 8/64/256
    python bench/teacher_throughput_vllm.py --backends vllm-pool,vllm-gen,vllm-pool-tp2,vllm-gen-tp2,hf

Paths per backend take turns request by request (rotating, so each path runs in each slot equally often)
and each timed call starts after `--settle-s` idle seconds: vLLM's CPU workers busy-poll their message
queue for 1 s after work, which otherwise steals the cores from whichever path runs next. Paths:
- "service": TeacherClient.score -> gRPC loopback -> `teacher_server.server --backend vllm ...` subprocess;
- "inproc": the same VLLMBackend called directly (`await backend.score(...)`);
- "vllm-prompt-logprobs" (vllm backends only): plain vLLM in this process, the way one would use it without
  asymkd: AsyncLLM + SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False) on token-id prompts,
  timed until the per-position dicts exist (nothing converted to tensors yet: a lower bound of its cost).
The goal of issue 4 is service >= 1.0x the last one ("service_over_vllm" in the JSON).

Backends: vllm-pool / vllm-gen = `--vllm.runner pooling / generate` (hidden states + output layer here, vs
vLLM prompt logprobs kept as tensors), "-tp2" = tensor parallel 2 ("0|1" core binding), hf = transformers.
Reuses bench/teacher_throughput.py (cases, paths, tables, plot); writes
bench/results/teacher_throughput_vllm.json (+ .png).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a checkout

from bench import benchlib as bl
from bench import teacher_throughput as tt
from teacher_server.backends.vllm import omp_threads_bind

log = logging.getLogger("bench")
KV_BYTES = str(512 << 20)
_VLLM = ["--backend", "vllm", "--vllm.kv-cache-memory-bytes", KV_BYTES, "--vllm.enforce-eager"]
_SERVER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": ""}  # the server derives it for its own TP size
tt.BACKENDS.update(
    {
        "vllm-pool": tt.BackendSpec([*_VLLM, "--vllm.runner", "pooling"], _SERVER_ENV),
        "vllm-gen": tt.BackendSpec([*_VLLM, "--vllm.runner", "generate"], _SERVER_ENV),
        "vllm-pool-tp2": tt.BackendSpec(
            [*_VLLM, "--vllm.runner", "pooling", "--tensor-parallel-size", "2"], _SERVER_ENV
        ),
        "vllm-gen-tp2": tt.BackendSpec(
            [*_VLLM, "--vllm.runner", "generate", "--tensor-parallel-size", "2"], _SERVER_ENV
        ),
    }
)


class VLLMPromptLogprobs:
    """Plain vLLM in-process prompt logprobs (the baseline), on a private event loop."""

    name = "vllm-prompt-logprobs"

    def __init__(self, model: Path, dtype: str, tp: int, max_top_k: int):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.loop = asyncio.new_event_loop()
        args = AsyncEngineArgs(
            model=str(model),
            dtype=dtype,
            tensor_parallel_size=tp,
            max_logprobs=max_top_k,
            skip_tokenizer_init=True,
            enforce_eager=True,
            kv_cache_memory_bytes=int(KV_BYTES),
            disable_log_stats=True,
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.ids = itertools.count()

    async def _one(self, seq: torch.Tensor, k: int):
        from vllm import SamplingParams, TokensPrompt

        sp = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        prompt = TokensPrompt(prompt_token_ids=seq.tolist())
        outs = [out async for out in self.engine.generate(prompt, sp, str(next(self.ids)))]
        return outs[-1].prompt_logprobs

    def score(self, seqs: list[torch.Tensor], case: tt.Case) -> None:
        k = case.top_k if case.signal == "top_k" else 0

        async def run():
            return await asyncio.gather(*(self._one(s, k) for s in seqs))

        self.loop.run_until_complete(run())

    def close(self) -> None:
        handler = self.engine.output_handler
        self.engine.shutdown()
        if handler is not None:  # cancelled by shutdown(); let it finish before the loop closes
            self.loop.run_until_complete(asyncio.wait([handler], timeout=5))
        self.loop.close()


def run_backend(name: str, model: Path, args, cases: list[tt.Case], vocab: int) -> list[dict]:
    """Every case on every path of one backend (tt.run_backend plus the plain-vLLM path)."""
    spec = tt.BACKENDS[name]
    argv = [
        *spec.serve_args,
        "--model",
        str(model),
        "--dtype",
        args.dtype,
        "--max-top-k",
        str(args.max_top_k),
    ]
    tp = int(argv[argv.index("--tensor-parallel-size") + 1]) if "--tensor-parallel-size" in argv else 1
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(tp, sorted(os.sched_getaffinity(0)))
    log.info("[%s] starting the paths", name)
    paths, rows = [], []
    try:
        paths.append(tt.InProcess(argv))
        paths.append(tt.Service(argv, spec.env, tt.LOGS / f"{name}.server.log"))
        if name.startswith("vllm"):
            paths.append(VLLMPromptLogprobs(model, args.dtype, tp, args.max_top_k))
        for p in paths:  # warm-up
            p.score(cases[0].sequences(vocab, seed=1), cases[0])
        for case in cases:
            seqs = case.sequences(vocab, seed=case.tokens)
            times: dict[str, list[float]] = {p.name: [] for p in paths}
            for r in range(args.repeats):
                for p in paths[r % len(paths) :] + paths[: r % len(paths)]:  # each path in each slot
                    time.sleep(args.settle_s)  # the previous engine's workers busy-poll for 1 s after work
                    t0 = time.perf_counter()
                    p.score(seqs, case)
                    times[p.name].append(time.perf_counter() - t0)
            for p in paths:
                rows.append(tt.summarize(name, p.name, case, times[p.name]))
                log.info(
                    "[%s] %-22s %-14s k=%-3d %9.0f tok/s",
                    name,
                    p.name,
                    case.label,
                    case.top_k,
                    rows[-1]["tokens_per_s"],
                )
    finally:
        for p in paths:
            p.close()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """service / plain-vLLM prompt_logprobs and service / inproc, per backend, case and k."""
    key = lambda r: (r["backend"], r["batch"], r["seq_len"], r["signal"], r["top_k"])  # noqa: E731
    by = {(key(r), r["path"]): r["tokens_per_s"] for r in rows}
    out = []
    for r in rows:
        if r["path"] != "service":
            continue
        raw = by.get((key(r), VLLMPromptLogprobs.name))
        inproc = by.get((key(r), "inproc"))
        out.append(
            dict(zip(("backend", "batch", "seq_len", "signal", "top_k"), key(r), strict=True))
            | {
                "service_tok_s": r["tokens_per_s"],
                "service_over_inproc": r["tokens_per_s"] / inproc if inproc else None,
                "service_over_vllm": r["tokens_per_s"] / raw if raw else None,
            }
        )
    return out


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["top_k"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(4.5 * len(ks), 4), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        for key in sorted({(r["backend"], r["path"]) for r in rows if r["top_k"] == k}):
            pts = sorted(
                (r["tokens"], r["tokens_per_s"])
                for r in rows
                if (r["backend"], r["path"]) == key and r["top_k"] == k
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(key))
        ax.set(xscale="log", xlabel="tokens per request", title=f"top-{k}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("tokens/s (median)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, small requests (smoke run)")
    ap.add_argument("--model", default="llama-58m", help="llama-58m | tiny | default | HF folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sizes", default=None, help="BxT,... (default 4x128,8x256; --quick 2x32,4x64)")
    ap.add_argument("--top-k", default=None, help="comma-separated k values (default 8,64,256; --quick 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case and path (default 3)")
    ap.add_argument("--backends", default="vllm-pool,vllm-gen,vllm-pool-tp2,vllm-gen-tp2")
    ap.add_argument("--settle-s", type=float, default=1.5, help="idle time before each timed call")
    ap.add_argument("--out", type=Path, default=tt.RESULTS / "teacher_throughput_vllm.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.repeats = args.repeats or 3
    ks = [int(k) for k in (args.top_k or ("8" if args.quick else "8,64,256")).split(",")]
    args.max_top_k = max(ks)
    sizes = args.sizes or ("2x32,4x64" if args.quick else "4x128,8x256")
    cases = [c for k in ks for c in tt.parse_cases(sizes, "top_k", k)]
    host = bl.machine_info({"vllm": bl._version("vllm")})
    model = tt.bench_model(args.model, args.quick)
    info = tt.describe_model(model)
    rows = []
    for name in args.backends.split(","):
        rows += run_backend(name, model, args, cases, info["vocab"])
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": host | {"load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "model": info | {"dtype": args.dtype},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
        "ratios": ratios(rows),
    }
    tt.RESULTS.mkdir(parents=True, exist_ok=True)
    bl.write_json(args.out, report)
    plot(
        rows,
        f"{Path(info['path']).name} ({info['params'] / 1e6:.0f}M, {args.dtype}), {os.cpu_count()} CPUs",
        args.out.with_suffix(".png"),
    )
    print(f"\n{'backend':<14} {'request':<10} {'k':>4} {'service tok/s':>14} {'/inproc':>8} {'/vllm':>8}")
    for r in report["ratios"]:
        fmt = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
        print(
            f"{r['backend']:<14} {r['batch']}x{r['seq_len']:<7} {r['top_k']:>4} {r['service_tok_s']:>14.0f} "
            f"{fmt(r['service_over_inproc']):>8} {fmt(r['service_over_vllm']):>8}"
        )
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
