"""Teacher scoring throughput: through the service vs the same backend in-process, in the same run.

    python bench/teacher_throughput.py                   # 58M Llama, 4x128 / 8x256 / 16x512 tokens, TOP_K 64
    python bench/teacher_throughput.py --quick           # tiny model, small requests: a smoke run (~1 min)
    python bench/teacher_throughput.py --model default   # the embedded SmolLM2-135M-Instruct
    python bench/teacher_throughput.py --full            # also FULL (log-softmax rows) at one small size

"service" = TeacherClient.score -> gRPC on loopback -> `teacher_server.server` subprocess (micro-batcher,
validation, wire codec) -> backend; "service-stream" (--stream) = score_stream with 4 requests in flight;
"inproc" = the same backend class, built from the same `asymkd serve` flags, called directly
(`await backend.score(items, params)`). Same model, dtype, requests; paths alternate request by request so
load from other processes hits them alike. Overhead = 1 - service tokens/s / inproc tokens/s.
Writes bench/results/teacher_throughput.json (+ .png) and prints a table.

Adding a backend (e.g. vLLM, TP=2): one entry in BACKENDS (its `asymkd serve` flags and server environment),
then `--backends hf,vllm`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from a checkout

from asymkd.config import load_config
from asymkd.contract import Signal
from bench import benchlib as bl
from teacher_server.backends import build_backend
from teacher_server.backends.base import ScoreItem, ScoreParams
from teacher_server.client import TeacherClient
from teacher_server.config import ServeConfig
from teacher_server.launch import LocalTeacher
from teacher_server.models import default_teacher_dir

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"
LOGS = bl.cache_root() / "runs" / "teacher_throughput"  # server logs (not results)


@dataclass
class BackendSpec:
    """How to run one backend: `asymkd serve` flags (also parsed into the in-process ServeConfig) and the
    server process's extra environment."""

    serve_args: list[str]
    env: dict[str, str] = field(default_factory=dict)


BACKENDS: dict[str, BackendSpec] = {
    "hf": BackendSpec(["--backend", "hf"]),
}


@dataclass
class Case:
    """One request shape: `batch` random sequences of `seq_len` tokens, scored with `signal`."""

    batch: int
    seq_len: int
    signal: str = "top_k"
    top_k: int = 64

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq_len} {self.signal}"

    def sequences(self, vocab: int, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (self.seq_len,), generator=g) for _ in range(self.batch)]


# ------------------------------------------------------------------------------------------ models
MODELS = {  # name -> Llama shape, random init, SmolLM2's 49,152-token tokenizer
    "llama-58m": bl.LlamaShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "tiny": bl.LlamaShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
}


def bench_model(name: str, quick: bool) -> Path:
    """The model folder: a MODELS entry (built once under the bench cache), "default" (SmolLM2-135M-Instruct)
    or an HF folder. --quick swaps the default llama-58m for "tiny"."""
    if quick and name == "llama-58m":
        name = "tiny"
    if name == "default":
        return default_teacher_dir()
    if name not in MODELS:
        return Path(name)
    return bl.build_model(bl.cache_root() / f"teacher_throughput-{name}", MODELS[name], seed=0)


def describe_model(folder: Path) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    return {
        "path": str(folder),
        "params": bl.count_params(folder),
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
    }


# ------------------------------------------------------------------------------------------- paths
class InProcess:
    """The backend called directly, on a private event loop."""

    name = "inproc"

    def __init__(self, argv: list[str]):
        self.loop = asyncio.new_event_loop()
        self.backend = build_backend(load_config(ServeConfig, None, argv))
        self.loop.run_until_complete(self.backend.start())

    def score(self, seqs: list[torch.Tensor], case: Case) -> None:
        params = ScoreParams(signal=Signal[case.signal.upper()], top_k=case.top_k)
        items = [ScoreItem(s) for s in seqs]
        self.loop.run_until_complete(self.backend.score(items, params))

    def close(self) -> None:
        self.loop.run_until_complete(self.backend.close())
        self.loop.close()


class Service:
    """A `teacher_server.server` subprocess on loopback, called through TeacherClient (unary Score, or
    ScoreStream with `in_flight` requests pipelined when in_flight > 0)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, in_flight: int = 0):
        self.name = f"service-stream{in_flight}" if in_flight else "service"
        self.in_flight = in_flight
        self.teacher = LocalTeacher(argv, env=env, log_path=log_path, start_timeout_s=900).start()
        self.client = TeacherClient([self.teacher.address], timeout_s=600)

    def score(self, seqs: list[torch.Tensor], case: Case) -> None:
        if not self.in_flight:
            self.client.score(seqs, signal=case.signal, top_k=case.top_k)
            return
        # the same tokens as `in_flight` requests on one stream (one sequence group each)
        groups = [seqs[i :: self.in_flight] for i in range(self.in_flight)]
        for _ in self.client.score_stream(
            groups, max_in_flight=self.in_flight, signal=case.signal, top_k=case.top_k
        ):
            pass

    def close(self) -> None:
        self.client.close()
        self.teacher.stop()


# ------------------------------------------------------------------------------------------ running
def run_backend(name: str, spec: BackendSpec, model: Path, args, cases: list[Case], vocab: int) -> list[dict]:
    """Every case on every path of one backend; the paths take turns request by request."""
    argv = [*spec.serve_args, "--model", str(model), "--dtype", args.dtype]
    log.info("[%s] starting the in-process backend and the server", name)
    paths, rows = [], []
    try:
        paths.append(InProcess(argv))
        paths.append(Service(argv, spec.env, LOGS / f"{name}.server.log"))
        if args.stream:
            paths.append(Service(argv, spec.env, LOGS / f"{name}.stream.log", in_flight=4))
        for p in paths:  # warm-up: first-call costs (allocations, lazy init, connections) are not throughput
            p.score(cases[0].sequences(vocab, seed=1), cases[0])
        for case in cases:
            seqs = case.sequences(vocab, seed=case.tokens)
            times: dict[str, list[float]] = {p.name: [] for p in paths}
            for r in range(args.repeats):
                for p in paths if r % 2 == 0 else paths[::-1]:
                    t0 = time.perf_counter()
                    p.score(seqs, case)
                    times[p.name].append(time.perf_counter() - t0)
            for p in paths:
                rows.append(summarize(name, p.name, case, times[p.name]))
                log.info("[%s] %-16s %-14s %9.0f tok/s", name, p.name, case.label, rows[-1]["tokens_per_s"])
    finally:
        for p in paths:
            p.close()
    return rows


def summarize(backend: str, path: str, case: Case, times: list[float]) -> dict:
    t = bl.summarize(times)
    return {
        "backend": backend,
        "path": path,
        **asdict(case),
        "tokens": case.tokens,
        "times_s": [round(x, 5) for x in times],
        "median_s": t["median"],
        "min_s": t["min"],
        "max_s": t["max"],
        "tokens_per_s": case.tokens / t["median"],
    }


def overheads(rows: list[dict]) -> list[dict]:
    """1 - service/inproc (median tokens/s) for every service path, backend and case."""
    base = {(r["backend"], r["batch"], r["seq_len"], r["signal"]): r for r in rows if r["path"] == "inproc"}
    out = []
    for r in rows:
        ref = base.get((r["backend"], r["batch"], r["seq_len"], r["signal"]))
        if r["path"] != "inproc" and ref:
            ratio = r["tokens_per_s"] / ref["tokens_per_s"]
            out.append(
                {k: r[k] for k in ("backend", "path", "batch", "seq_len", "signal", "tokens")}
                | {"overhead": 1 - ratio, "service_over_inproc": ratio}
            )
    return out


def print_table(rows: list[dict], over: list[dict]) -> None:
    ov = {(o["backend"], o["path"], o["batch"], o["seq_len"], o["signal"]): o["overhead"] for o in over}
    print(
        f"\n{'backend':<8} {'path':<16} {'request':<16} {'tokens':>7} {'tok/s med':>10} {'min s':>8} "
        f"{'med s':>8} {'max s':>8} {'overhead':>9}"
    )
    for r in rows:
        o = ov.get((r["backend"], r["path"], r["batch"], r["seq_len"], r["signal"]))
        print(
            f"{r['backend']:<8} {r['path']:<16} {r['batch']}x{r['seq_len']} {r['signal']:<8} {r['tokens']:>7} "
            f"{r['tokens_per_s']:>10.0f} {r['min_s']:>8.3f} {r['median_s']:>8.3f} {r['max_s']:>8.3f} "
            f"{'' if o is None else f'{o:>8.1%}':>9}"
        )


def plot(rows: list[dict], over: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["backend"], r["path"], r["signal"]) for r in rows}):
        pts = sorted(
            (r["tokens"], r["tokens_per_s"], r["min_s"], r["max_s"])
            for r in rows
            if (r["backend"], r["path"], r["signal"]) == key
        )
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        lo = [y_ - p[0] / p[3] for y_, p in zip(y, pts, strict=True)]
        hi = [p[0] / p[2] - y_ for y_, p in zip(y, pts, strict=True)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=" ".join(key))
    ax.set(xscale="log", xlabel="tokens per request", ylabel="tokens/s (median, bars: min-max)", title=title)
    ax.legend(fontsize=8)
    for key in sorted({(o["backend"], o["path"], o["signal"]) for o in over}):
        pts = sorted(
            (o["tokens"], 100 * o["overhead"]) for o in over if (o["backend"], o["path"], o["signal"]) == key
        )
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=" ".join(key))
    ax2.axhline(10, color="grey", ls="--", lw=1, label="10% target")
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set(
        xscale="log",
        xlabel="tokens per request",
        ylabel="overhead % (1 - service/inproc)",
        title="service overhead",
    )
    ax2.legend(fontsize=8)
    sizes = sorted({r["tokens"] for r in rows})
    for a in (ax, ax2):
        a.set_xticks(sizes, [str(t) for t in sizes])
        a.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_cases(text: str, signal: str, top_k: int) -> list[Case]:
    return [Case(*map(int, s.lower().split("x")), signal=signal, top_k=top_k) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and small requests (smoke run)")
    ap.add_argument(
        "--model", default="llama-58m", help="llama-58m | tiny | default (SmolLM2-135M) | HF folder"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--sizes", default=None, help="BxT,... (default 4x128,8x256,16x512; --quick 2x32,4x64)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--full", action="store_true", help="also FULL at 2x64 tokens (unary message limits)")
    ap.add_argument(
        "--stream", action="store_true", help="also the service through score_stream, 4 in flight"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 3; --quick 2)")
    ap.add_argument("--backends", default="hf", help=f"comma-separated, of {sorted(BACKENDS)}")
    ap.add_argument("--out", type=Path, default=RESULTS / "teacher_throughput.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.repeats = args.repeats or (2 if args.quick else 3)
    cases = parse_cases(
        args.sizes or ("2x32,4x64" if args.quick else "4x128,8x256,16x512"), "top_k", args.top_k
    )
    if args.full:
        cases += parse_cases("2x64", "full", 0)
    host = bl.machine_info()
    model = bench_model(args.model, args.quick)
    info = describe_model(model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.backends.split(","):
        rows += run_backend(name, BACKENDS[name], model, args, cases, info["vocab"])
    over = overheads(rows)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": host | {"load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "torch_threads": torch.get_num_threads(),
        "model": info | {"dtype": args.dtype},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": rows,
        "overhead": over,
    }
    bl.write_json(args.out, report)
    title = f"{Path(info['path']).name} ({info['params'] / 1e6:.0f}M, {args.dtype}), {os.cpu_count()} CPUs"
    plot(rows, over, title, args.out.with_suffix(".png"))
    print_table(rows, over)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
