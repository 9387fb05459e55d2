"""Load test of the teacher service on loopback: many streaming clients, under and beyond capacity.

    python bench/load.py             # 32 clients × 60 s under capacity, then 32 clients × 30 s over it
    python bench/load.py --quick     # 8 clients × 8 s each phase, tiny model: does the bench still work?

Each client is an AsyncTeacherClient of its own (its own gRPC channel and connection) that keeps
`--in-flight` requests in flight, each on its own ScoreStream call, as the trainer's teacher feed does; a
request is `--seqs` random sequences of `--tokens` tokens, TOP_K `--top-k`. Two phases, each against a fresh
`asymkd serve` (hf backend, a random Llama):
  under  - the default queue (256 requests): every request must be answered (zero errors); latency p50/p99
           (send -> result), requests/s and tokens/s, the server's peak RSS.
  over   - `--max-queue-requests` tight (default 4): the server must refuse the rest at once with
           RESOURCE_EXHAUSTED (nothing else; a probe client without retries times its refusals), gRPC's
           retry policy backs the clients off (server-side refusals outnumber what reaches the callers), and
           the server's memory must stay bounded.
Stops by itself: each phase ends after its duration (calls then in flight are cancelled), with a hard limit.
Writes bench/results/load.json (+ load.png; --quick: under $ASYMKD_CACHE/bench/runs/load): the machine, the load average at start and end, per phase the
outcomes by status, latencies, throughput and the server's RSS over time. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import logging
import os
import re
import resource
import sys
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/load.py` from a checkout

from asymkd.wire import ScoreQuery
from bench import benchlib as bl
from teacher_server.client import AsyncTeacherClient, TeacherError
from teacher_server.launch import LocalTeacher, free_port

log = logging.getLogger("bench")
RESULTS = bl.RESULTS_DIR
LOGS = bl.cache_root() / "runs" / "load"  # server logs (not results)
MODELS = {  # a random Llama (tiny BPE tokenizer); the load is on the service, the model is kept modest
    "quick": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "vocab_size": 512},
    "small": {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "vocab_size": 2048},
}
ALLOWED_OVER = {"OK", "RESOURCE_EXHAUSTED"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 clients, 8 s per phase, tiny model (smoke run)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (own channel each)")
    p.add_argument("--duration-s", type=float, default=60.0, help="the under-capacity phase")
    p.add_argument("--over-duration-s", type=float, default=30.0, help="the over-capacity phase")
    p.add_argument("--in-flight", type=int, default=2, help="requests in flight per client")
    p.add_argument("--seqs", type=int, default=2, help="sequences per request")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--max-queue-requests", type=int, default=4, help="the over-capacity server's queue")
    p.add_argument("--max-retries", type=int, default=3, help="the clients' gRPC retry policy (attempts - 1)")
    p.add_argument("--out", type=Path, help="default bench/results/load.json (--quick: under $ASYMKD_CACHE)")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.duration_s, args.over_duration_s = 8, 8.0, 8.0
    args.out = args.out or (LOGS / "load-quick.json" if args.quick else RESULTS / "load.json")
    return args


# ------------------------------------------------------------------------------------------------ clients
class Tally:
    """What the clients saw in one phase: per-request latency (OK) and outcome counts by status."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()  # the phase's start
        self.series: list[tuple[float, float]] = []  # (s since the start, latency s) per answered request
        self.latencies_s: list[float] = []
        self.refusal_s: list[float] = []  # send -> error, for refused requests
        self.codes: collections.Counter[str] = collections.Counter()
        self.details: dict[str, str] = {}  # one example message per status
        self.tokens = 0


async def run_client(i: int, address: str, args, deadline: float, tally: Tally, vocab: int) -> None:
    gen = torch.Generator().manual_seed(i)
    client = AsyncTeacherClient([address], timeout_s=30.0, max_retries=args.max_retries)

    async def one_request() -> None:
        seqs = torch.randint(0, vocab, (args.seqs, args.tokens), generator=gen)
        query = ScoreQuery(list(seqs), top_k=args.top_k)
        t0 = time.perf_counter()
        try:
            async for _ in client.score_stream([query], max_in_flight=1):
                pass
            tally.latencies_s.append(time.perf_counter() - t0)
            tally.series.append((round(time.monotonic() - tally.t0, 2), round(tally.latencies_s[-1], 3)))
            tally.codes["OK"] += 1
            tally.tokens += args.seqs * args.tokens
        except TeacherError as e:
            tally.refusal_s.append(time.perf_counter() - t0)
            tally.codes[e.code.name] += 1
            tally.details.setdefault(e.code.name, e.details[:200])

    async def lane() -> None:
        while time.monotonic() < deadline:  # a new request after each answer or refusal (not a retry)
            await one_request()

    try:
        lanes = [asyncio.create_task(lane()) for _ in range(args.in_flight)]
        await asyncio.wait(lanes, timeout=max(deadline - time.monotonic(), 0) + 35.0)
        for t in lanes:
            t.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
    finally:
        await client.close()


def vm_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def sample_rss(pid: int, every_s: float, out: list[tuple[float, float]], t0: float) -> None:
    while True:
        out.append((round(time.monotonic() - t0, 2), round(vm_rss_mb(pid), 1)))
        await asyncio.sleep(every_s)


def server_refusals(metrics_port: int) -> dict[str, float]:
    """The server's own count of answered requests by status (Prometheus), ScoreStream only."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    pattern = r'asymkd_teacher_requests_total\{code="(\w+)",rpc="ScoreStream"\} (\S+)'
    return {code: float(v) for code, v in re.findall(pattern, text)}


# ------------------------------------------------------------------------------------------------ phases
async def drive(
    address: str, args, duration_s: float, pid: int, vocab: int, probe: Tally
) -> tuple[Tally, list, float]:
    """The clients (and one probe client without retries, one request at a time) until the deadline."""
    tally = Tally()
    rss, t0 = [], tally.t0
    probe.t0 = t0
    sampler = asyncio.create_task(sample_rss(pid, 0.5, rss, t0))
    deadline = t0 + duration_s
    clients = [run_client(i, address, args, deadline, tally, vocab) for i in range(args.clients)]
    probe_args = argparse.Namespace(**{**vars(args), "max_retries": 0, "in_flight": 1})
    clients.append(run_client(10_000, address, probe_args, deadline, probe, vocab))
    try:
        await asyncio.wait_for(asyncio.gather(*clients), timeout=duration_s + 60.0)  # hard stop
    finally:
        sampler.cancel()
    return tally, rss, time.monotonic() - t0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def run_phase(name: str, model_dir: Path, args, duration_s: float, extra: list[str], vocab: int) -> dict:
    metrics_port = free_port()
    serve = ["--model", str(model_dir), "--backend", "hf", "--metrics-port", str(metrics_port), *extra]
    log.info(
        "phase %s: %d clients × %.0f s, %s", name, args.clients, duration_s, " ".join(extra) or "defaults"
    )
    teacher = LocalTeacher(serve, log_path=LOGS / f"{name}.log", start_timeout_s=300).start()
    peak = bl.ProcessTreePeak(teacher.proc.pid)
    try:
        rss_start = vm_rss_mb(teacher.proc.pid)
        probe = Tally()
        run = drive(teacher.address, args, duration_s, teacher.proc.pid, vocab, probe)
        tally, rss, wall_s = asyncio.run(run)
        server = server_refusals(metrics_port)
        peak_mb = peak.read_mb()
    finally:
        teacher.stop()
    ok = tally.codes["OK"]
    lat = tally.latencies_s
    result = {
        "duration_s": round(wall_s, 2),
        "serve_args": extra,
        "outcomes": dict(tally.codes),
        "error_examples": tally.details,
        "server_answers_by_status": server,
        "requests_per_s": round(ok / wall_s, 2),
        "tokens_per_s": round(tally.tokens / wall_s, 1),
        "latency_ms": {
            "p50": _ms(percentile(lat, 50)),
            "p90": _ms(percentile(lat, 90)),
            "p99": _ms(percentile(lat, 99)),
            "max": _ms(max(lat) if lat else None),
        },
        "refusal_ms": _p50_p99(tally.refusal_s),
        "probe_without_retries": {
            "outcomes": dict(probe.codes),
            "refusal_ms": _p50_p99(probe.refusal_s),
            "latency_ms": _p50_p99(probe.latencies_s),
        },
        "server_rss_mb": {"start": round(rss_start, 1), "peak_vmhwm": round(peak_mb, 1), "samples": rss},
        "latency_series_s": tally.series,
    }
    log.info(
        "phase %s: %s; %.1f req/s, p50 %s ms, p99 %s ms; server RSS %.0f -> peak %.0f MB",
        name,
        dict(tally.codes),
        result["requests_per_s"],
        result["latency_ms"]["p50"],
        result["latency_ms"]["p99"],
        rss_start,
        peak_mb,
    )
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _p50_p99(values: list[float]) -> dict:
    return {"p50": _ms(percentile(values, 50)), "p99": _ms(percentile(values, 99))}


def _at_once(phase: dict) -> bool:
    refused, answered = phase["probe_without_retries"]["refusal_ms"]["p50"], phase["latency_ms"]["p50"]
    return refused is not None and answered is not None and refused < answered


def checks(under: dict, over: dict) -> dict[str, bool]:
    """What the run must show (see the module docstring); the probe client's outcomes count too."""
    refused_by_server = over["server_answers_by_status"].get("RESOURCE_EXHAUSTED", 0)
    seen = {
        name: {*ph["outcomes"], *ph["probe_without_retries"]["outcomes"]}
        for name, ph in (("under", under), ("over", over))
    }
    return {
        "under: zero errors": seen["under"] == {"OK"} and set(under["server_answers_by_status"]) == {"OK"},
        "over: only OK and RESOURCE_EXHAUSTED": seen["over"] <= ALLOWED_OVER
        and set(over["server_answers_by_status"]) <= ALLOWED_OVER,
        "over: requests were refused": refused_by_server > 0,
        "over: refused at once (probe without retries: refusal p50 < answer p50)": _at_once(over),
        "over: gRPC retried refusals (server refusals > caller errors)": refused_by_server
        > over["outcomes"].get("RESOURCE_EXHAUSTED", 0)
        + over["probe_without_retries"]["outcomes"].get("RESOURCE_EXHAUSTED", 0),
        "over: server peak RSS within 1.5x of under": over["server_rss_mb"]["peak_vmhwm"]
        <= 1.5 * under["server_rss_mb"]["peak_vmhwm"],
    }


# ------------------------------------------------------------------------------------------------- report
def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = data["phases"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    ax = axes[0]
    for name, ph in phases.items():
        lat = ph["latency_ms"]
        ax.bar([f"{name}\np50", f"{name}\np99"], [lat["p50"] or 0, lat["p99"] or 0])
    ax.set_ylabel("latency per request, ms (send -> result)")
    ax.set_title(f"{data['args']['clients']} streaming clients: answered requests")
    ax = axes[1]
    for name, ph in phases.items():
        if ph["latency_series_s"]:
            t, lat = zip(*ph["latency_series_s"], strict=True)
            ax.scatter(t, lat, s=4, label=name)
    ax.set_xlabel("s (request answered at)")
    ax.set_ylabel("latency, s")
    ax.set_title("latency over time")
    ax.legend()
    ax = axes[2]
    for name, ph in phases.items():
        t, mb = (
            zip(*ph["server_rss_mb"]["samples"], strict=True) if ph["server_rss_mb"]["samples"] else ((), ())
        )
        ax.plot(t, mb, label=f"{name} (peak {ph['server_rss_mb']['peak_vmhwm']:.0f} MB)")
    ax.set_xlabel("s")
    ax.set_ylabel("server RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("server memory")
    ax.legend()
    ax = axes[3]
    codes = sorted({c for ph in phases.values() for c in ph["outcomes"]})
    width = 0.8 / max(len(codes), 1)
    for j, code in enumerate(codes):
        xs = [i + j * width for i in range(len(phases))]
        ax.bar(xs, [ph["outcomes"].get(code, 0) for ph in phases.values()], width, label=f"caller: {code}")
    refused = [ph["server_answers_by_status"].get("RESOURCE_EXHAUSTED", 0) for ph in phases.values()]
    ax.scatter([i + 0.4 for i in range(len(phases))], refused, color="k", marker="x", label="server refusals")
    ax.set_xticks([i + 0.4 for i in range(len(phases))], list(phases))
    ax.set_title("outcomes (gRPC retries refusals with backoff)")
    ax.legend()
    fig.suptitle(
        f"load test, {data['machine']['cpu_count']} cores; load avg {data['load_average_start']} -> "
        f"{data['load_average_end']}"
    )
    bl.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(max_load=1.0, logger=log)
    la_start = [round(x, 2) for x in os.getloadavg()]
    shape = MODELS["quick" if args.quick else "small"]
    from tests.tiny_models import build_tiny_llama

    model_dir = bl.cache_root() / "models" / ("load-" + "-".join(f"{v}" for v in shape.values()))
    if not (model_dir / "config.json").exists():
        build_tiny_llama(model_dir, max_position_embeddings=max(512, args.tokens), seed=0, **shape)
    LOGS.mkdir(parents=True, exist_ok=True)
    vocab = shape["vocab_size"]
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    under = run_phase("under", model_dir, args, args.duration_s, [], vocab)
    over_args = ["--max-queue-requests", str(args.max_queue_requests)]
    over = run_phase("over", model_dir, args, args.over_duration_s, over_args, vocab)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    verdict = checks(under, over)
    data = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": bl.machine_info(),
        "load_average_start": la_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "load_1m_at_start": load0,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": shape,
        "client_process_cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        "phases": {"under": under, "over": over},
        "checks": verdict,
    }
    bl.write_json(args.out, data)
    plot(data, args.out.with_suffix(".png"))
    for name, ok in verdict.items():
        log.info("%s %s", "PASS" if ok else "FAIL", name)
    log.info("wrote %s (+ .png); load average %s -> %s", args.out, la_start, data["load_average_end"])
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
