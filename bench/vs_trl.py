"""asymkd vs TRL GKDTrainer: same teacher/student pair, data, loss, steps, batch, precision; A/B alternated.

    python bench/vs_trl.py                  # CPU pair (teacher ~59M / student ~20M, vocab 49,152), 3 repeats
    python bench/vs_trl.py --quick          # smoke run: tiny pair, few steps, 1 repeat
    python bench/vs_trl.py --split-cores    # also: teacher pinned to one core, student to the other
    python bench/vs_trl.py --gpu            # GPU pair (~1.2B-config teacher / ~120M student), bf16

TRL runs in its own venv (bench/.venv-trl, created here: TRL is never an asymkd dependency) through
bench/trl_gkd_run.py: GKDTrainer with lmbda=0 (no on-policy generation), β ∈ {0, 0.5}, full-vocabulary
logits of both models in one process. asymkd runs as a user runs it: a teacher server (LocalTeacher; hf and,
when vllm is installed, vllm backends) and `asymkd train` with `distill.loss: jsd` at the same β (the two
conventions are the same: β=0 forward KL, β=1 reverse KL, M = βP + (1−β)Q in between), top-64 + tail, and
also the full distribution TRL computes: the FULL signal over gRPC and over the torch data plane
(`teacher.data_plane: torch`), and the HIDDEN signal (the student applies the teacher's output layer: the
same exact distribution, 85× fewer bytes), over gRPC and over the torch data plane. Reference points: the
CE-only student, the teacher alone (scoring the same batches), and the sequential bound 1/(1/CE + 1/teacher).

Writes bench/results/vs_trl.json (the machine described, every run, medians/min/max, ratios) and
bench/results/vs_trl.png.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/vs_trl.py` from the repo root

from bench import benchlib as bl
from bench import vs_trl_report as report
from bench.runner import Placement, measure, record, start_teacher, tail

log = logging.getLogger("bench.vs_trl")
TRL_VENV = bl.BENCH_DIR / ".venv-trl"
TRL_VERSION = "1.16.0"


# ------------------------------------------------------------------------------------------------ setup
@dataclass(frozen=True)
class Pair:
    name: str
    teacher: bl.LlamaShape
    student: bl.LlamaShape
    batch_size: int = 4
    seq_len: int = 256
    device: str = "cpu"
    dtype: str = "float32"


PAIRS = {
    # ~59M teacher / ~20M student, tied embeddings, SmolLM2 tokenizer (49,152 ids); head_dim 64 (vLLM CPU ok).
    "cpu": Pair("cpu", bl.LlamaShape(512, 10, 8, 1536), bl.LlamaShape(256, 7, 4, 1024)),
    "quick": Pair("quick", bl.LlamaShape(128, 2, 2, 384), bl.LlamaShape(64, 2, 1, 192), 2, 128),
    # GPU: ~1.2B-config teacher / ~120M student, bf16 (same precision on both sides).
    "gpu": Pair(
        "gpu",
        bl.LlamaShape(2048, 16, 32, 8192),
        bl.LlamaShape(768, 12, 12, 2048),
        8,
        1024,
        "cuda",
        "bfloat16",
    ),
}


def ensure_trl_venv(venv: Path = TRL_VENV) -> Path:
    """bench/.venv-trl with trl + the project's own torch and transformers versions (pinned in one pip call,
    so no dependency can pull another torch build)."""
    import torch
    import transformers

    want = {
        "trl": TRL_VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    py = venv / "bin" / "python"
    probe = "import json, trl, transformers, torch; print(json.dumps([trl.__version__, transformers.__version__, torch.__version__]))"
    if py.exists():
        out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            have = json.loads(out.stdout.strip().splitlines()[-1])
            if [have[0], have[1], have[2].split("+")[0]] == [
                want["trl"],
                want["transformers"],
                want["torch"],
            ]:
                return py
    log.info("creating %s with %s (once; ~1 min)", venv, want)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = [
        f"torch=={want['torch']}",
        f"transformers=={want['transformers']}",
        f"trl=={want['trl']}",
        "psutil",
    ]
    subprocess.run([py, "-m", "pip", "install", "-q", *pins], check=True)
    return py


def build_pair(pair: Pair) -> tuple[Path, Path]:
    root = bl.cache_root() / f"pair-{pair.name}"
    teacher = bl.build_model(root / "teacher", pair.teacher, seed=1, max_len=max(2048, pair.seq_len))
    student = bl.build_model(root / "student", pair.student, seed=2, max_len=max(2048, pair.seq_len))
    return teacher, student


def training_batches(student_dir: Path, pair: Pair, steps: int, seed: int) -> list[dict]:
    """The exact micro-batches `asymkd train` will train on (its data pipeline, its seeded order)."""
    from transformers import AutoTokenizer

    from asymkd.contract import tokenizer_hash
    from student_trainer.config import DataSection
    from student_trainer.data import PackedDataset, load_packs

    data = DataSection(builtin="stdlib-docs", seq_len=pair.seq_len)
    tok = AutoTokenizer.from_pretrained(student_dir)
    packs = load_packs(data, tok, tokenizer_hash(student_dir) or str(student_dir.resolve()))
    ds = PackedDataset(packs["train"], micro_batch_size=pair.batch_size, seed=seed, shuffle=True)
    return [ds.batch(i) for i in range(steps)]


def save_trl_tokens(batches: list[dict], path: Path) -> Path:
    """input_ids + labels (-100 where asymkd's loss mask is False) for the TRL side."""
    import torch

    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["loss_mask"] for b in batches])
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = torch.where(mask, ids[:, 1:], -100)
    torch.save({"input_ids": ids, "labels": labels}, path)
    return path


# -------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One measurement. `server`: which teacher server it needs, as (backend, placement, group); runs with
    the same server key back to back share one server (vLLM takes ~1 min to start); None = no server."""

    name: str
    kind: str  # trl | asymkd | ce | teacher
    beta: float = 0.0
    signal: str = "top_k"
    placement: str = "shared"
    server: tuple[str, str, str] | None = None
    plane: str = "grpc"  # teacher.data_plane


# (signal, teacher.data_plane, run name part): the asymkd runs that train on the full distribution, as TRL does
FULL_DISTRIBUTION = [
    ("full", "grpc", "full"),
    ("full", "torch", "full_torch"),
    ("hidden", "grpc", "hidden"),
    ("hidden", "torch", "hidden_torch"),
]


def plan(args: argparse.Namespace) -> list[RunSpec]:
    """One repeat, in order: per β, TRL then asymkd right after it (A/B); then the reference points. Each
    hf-backed run gets a fresh server (its teacher memory is its own); the vllm runs of one placement share
    one server, started after the TRL runs so that no idle engine shares the cores with TRL."""
    placements = ["shared"] + (["split"] if args.split_cores else [])
    runs: list[RunSpec] = []
    for beta in args.betas:
        runs.append(RunSpec(f"trl_gkd_b{beta:g}", "trl", beta))
        runs.append(RunSpec(f"asymkd_hf_topk_b{beta:g}", "asymkd", beta, server=("hf", "shared", f"b{beta}")))
        if beta in args.full_betas:  # the full distribution, each with its own server (its own memory)
            for signal, plane, name in FULL_DISTRIBUTION:
                sv = ("hf", "shared", f"{name}{beta}")
                runs.append(
                    RunSpec(f"asymkd_hf_{name}_b{beta:g}", "asymkd", beta, signal, server=sv, plane=plane)
                )
    for pl in placements:
        sfx = "" if pl == "shared" else "_split"
        runs.append(RunSpec(f"ce_only{sfx}", "ce", placement=pl))
        runs.append(RunSpec(f"teacher_alone_hf{sfx}", "teacher", placement=pl, server=("hf", pl, "alone")))
        if pl == "split":
            for beta in args.betas:
                sv = ("hf", pl, f"b{beta}")
                runs.append(
                    RunSpec(f"asymkd_hf_topk_b{beta:g}{sfx}", "asymkd", beta, placement=pl, server=sv)
                )
        if args.vllm_reason is None:
            sv = ("vllm", pl, "all")
            runs.append(RunSpec(f"teacher_alone_vllm{sfx}", "teacher", placement=pl, server=sv))
            for beta in args.betas:
                runs.append(
                    RunSpec(f"asymkd_vllm_topk_b{beta:g}{sfx}", "asymkd", beta, placement=pl, server=sv)
                )
    return runs


def asymkd_config(
    student: Path, pair: Pair, args, *, beta: float, signal: str | None, plane: str = "grpc"
) -> dict:
    """The asymkd side of the A/B: the optimizer and schedule TRL's defaults give (AdamW β=(0.9, 0.999),
    no weight decay, constant LR, clip 1.0), one rank, no export. signal None = CE-only (no teacher)."""
    optim = {"lr": args.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "warmup_steps": 0}
    optim |= {"schedule": "constant", "grad_clip": 1.0, "micro_batch_size": pair.batch_size}
    cfg = {
        "model": {"path": str(student), "dtype": "float32"},
        "data": {"builtin": "stdlib-docs", "seq_len": pair.seq_len, "shuffle": True},
        "optim": optim,
        "parallel": {"device": pair.device, "param_dtype": pair.dtype},
        "distill": {"loss": "jsd", "beta": beta, "kd_weight": 1.0, "ce_weight": 0.0},
        # a generous timeout: the cores may be shared
        "teacher": {"prefetch": args.prefetch, "timeout_s": 900.0, "data_plane": plane},
        "checkpoint": {"export": False},
        "metrics": {"log_every": 1},
        "run": {"steps": args.steps, "seed": args.seed},
    }
    if signal is not None:
        cfg["distill"] |= {"signal": signal} | ({"top_k": args.top_k} if signal == "top_k" else {})
    return cfg


def run_trl(ctx: dict, args, beta: float, log_path: Path) -> dict:
    pair = ctx["pair"]
    cmd = [str(ctx["trl_py"]), str(bl.BENCH_DIR / "trl_gkd_run.py"), "--teacher", str(ctx["teacher"])]
    cmd += ["--student", str(ctx["student"]), "--tokens", str(ctx["tokens"]), "--steps", str(args.steps)]
    cmd += ["--batch-size", str(pair.batch_size), "--beta", str(beta), "--lr", str(args.lr)]
    cmd += ["--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    cmd += ["--device", pair.device, "--dtype", pair.dtype]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"TRL run failed ({out.returncode}); log {log_path}:\n{tail(log_path)}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.pop("losses", None)
    return res | {"total_peak_mb": res["peak_rss_mb"]}


class Servers:
    """At most one teacher server at a time: started on demand, reused while the server key stays the same."""

    def __init__(self, ctx: dict, args) -> None:
        self.ctx, self.args = ctx, args
        self.key: tuple | None = None
        self.stack = contextlib.ExitStack()
        self.teacher = None

    def get(self, key: tuple[str, str, str] | None, log_dir: Path):
        if key != self.key:
            self.close()
            if key is not None:
                backend, placement, _ = key
                pair = self.ctx["pair"]
                self.teacher = self.stack.enter_context(
                    start_teacher(
                        self.ctx["teacher"], backend, self.ctx["placements"][placement], log_dir / "teacher.log",
                        dtype=pair.dtype, extra_args=["--device", pair.device, *self.args.serve_args],
                    )
                )  # fmt: skip
            self.key = key
        return self.teacher

    def close(self) -> None:
        self.stack.close()
        self.key, self.teacher = None, None


def run_one(spec: RunSpec, ctx: dict, servers: Servers, repeat: int, args) -> dict:
    out = ctx["work"] / f"r{repeat}" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    placement = ctx["placements"][spec.placement]
    teacher = servers.get(spec.server, out)
    t0 = time.perf_counter()
    if spec.kind == "trl":
        res = run_trl(ctx, args, spec.beta, out / "trl.log")
    else:
        signal = None if spec.kind in ("ce", "teacher") else spec.signal
        cfg = asymkd_config(
            ctx["student"], ctx["pair"], args, beta=spec.beta, signal=signal, plane=spec.plane
        )
        if signal is None:
            cfg["teacher"].pop("data_plane")
        res = measure(
            spec.kind, cfg, out, teacher=teacher, placement=placement, batches=ctx["batches"], args=args
        )
    return record(spec, repeat, res, time.perf_counter() - t0, log)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny pair, batch 2 × 128, 5 steps, β=0")
    p.add_argument("--gpu", action="store_true", help="the GPU pair, bf16 on cuda (needs a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 16; quick 5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out (default 3; quick 2)")
    p.add_argument("--betas", type=float, nargs="+", default=None, help="default 0 0.5 (quick: 0)")
    p.add_argument("--full-betas", type=float, nargs="*", default=[0.0], help="β values also run with FULL")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-cores", action="store_true", help="also: teacher and student on separate cores")
    p.add_argument("--no-vllm", action="store_true", help="skip the vllm backend even when installed")
    p.add_argument("--max-load", type=float, default=1.5, help="warn when the 1-min load average is above")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/vs_trl.json)")
    p.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `asymkd serve` flags (last)"
    )
    args = p.parse_args(argv)
    args.pair = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    args.steps = args.steps or (5 if args.quick else 16)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3)
    args.betas = args.betas or ([0.0] if args.quick else [0.0, 0.5])
    args.full_betas = [b for b in args.full_betas if b in args.betas]
    if args.quick and args.repeats == p.get_default("repeats"):
        args.repeats = 1
    if args.out is None:  # a smoke run never overwrites the published results
        args.out = bl.cache_root() / "vs_trl_quick.json" if args.quick else bl.RESULTS_DIR / "vs_trl.json"
    args.vllm_reason = "--no-vllm" if args.no_vllm else vllm_available()
    return args


def vllm_available() -> str | None:
    """None when the vllm backend can run here, else why not."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed in this venv"
    if importlib.util.find_spec("teacher_server.backends.vllm") is None:
        return "teacher_server.backends.vllm is missing"
    return None


def describe(args, pair: Pair, teacher: Path, student: Path, specs: list[RunSpec]) -> dict:
    return {
        "pair": pair.name, "teacher": vars(pair.teacher), "student": vars(pair.student),
        "teacher_params_m": bl.count_params(teacher) / 1e6, "student_params_m": bl.count_params(student) / 1e6,
        "vocab_size": 49152, "batch_size": pair.batch_size, "seq_len": pair.seq_len, "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps, "repeats": args.repeats, "betas": args.betas,
        "full_betas": args.full_betas, "top_k": args.top_k, "prefetch": args.prefetch, "lr": args.lr,
        "precision": pair.dtype, "device": pair.device, "vllm": args.vllm_reason or "included",
        "split_cores": args.split_cores, "order_of_one_repeat": [s.name for s in specs],
        "data": "builtin stdlib-docs corpus: asymkd's packed rows, in its seeded order, fed to both sides",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    pair = PAIRS[args.pair]
    teacher, student = build_pair(pair)
    work = bl.cache_root() / "runs" / f"vs_trl-{pair.name}"
    batches = training_batches(student, pair, args.steps, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"pair": pair, "teacher": teacher, "student": student, "batches": batches, "work": work,
           "tokens": save_trl_tokens(batches, work / "trl_tokens.pt"), "trl_py": ensure_trl_venv(),
           "placements": {"shared": Placement.shared()} | ({"split": Placement.split()} if args.split_cores else {})}  # fmt: skip
    if args.vllm_reason:
        log.info("vllm backend skipped: %s", args.vllm_reason)
    specs, runs, servers = plan(args), [], Servers(ctx, args)
    t0 = time.perf_counter()
    try:
        for rep in range(args.repeats):
            for spec in specs:
                runs.append(run_one(spec, ctx, servers, rep, args))
            servers.close()
            write_results(args, argv, ctx, specs, runs, load0, time.perf_counter() - t0)  # after every repeat
    finally:
        servers.close()
    return 0


def full_distribution_vs_trl(runs: list[dict]) -> dict:
    """Each asymkd run on the full distribution against TRL at its β (paired by repeat): samples/s ratio,
    trainer + teacher peak memory against TRL's one process, final loss agreement. Goal: ratio ≥ 1 with
    memory ≤ TRL's."""
    out = {}
    for r in runs:
        part = next((n for _, _, n in FULL_DISTRIBUTION if r["name"].startswith(f"asymkd_hf_{n}_b")), None)
        if part is None or r["name"] in out:
            continue
        trl = f"trl_gkd_b{r['beta']:g}"
        mine = [x for x in runs if x["name"] == r["name"]]
        theirs = {x["repeat"]: x for x in runs if x["name"] == trl}
        pairs = [(m, theirs[m["repeat"]]) for m in mine if m["repeat"] in theirs]
        if not pairs:
            continue
        speed = bl.summarize([m["samples_per_s"] / t["samples_per_s"] for m, t in pairs])
        memory = bl.summarize([m["total_peak_mb"] / t["total_peak_mb"] for m, t in pairs])
        loss = [
            abs(m["final_loss"] - t["final_loss"]) / t["final_loss"] for m, t in pairs if t.get("final_loss")
        ]
        out[r["name"]] = {
            "vs": trl, "samples_per_s_ratio": speed, "total_peak_memory_ratio": memory,
            "final_loss_rel_diff": loss, "met": speed["median"] >= 1.0 and memory["median"] <= 1.0,
        }  # fmt: skip
    return out


def write_results(args, argv, ctx: dict, specs: list[RunSpec], runs: list[dict], load0: float, wall_s: float):
    machine = bl.machine_info({"trl": TRL_VERSION}) | {"load_average_1m_at_start": round(load0, 2)}
    loads = [r["load_average_1m"] for r in runs]
    machine["load_average_1m_after_each_run"] = {"min": min(loads), "median": sorted(loads)[len(loads) // 2],
                                                 "max": max(loads)}  # fmt: skip
    result = {
        "benchmark": "vs_trl",
        "command": "python bench/vs_trl.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "config": describe(args, ctx["pair"], ctx["teacher"], ctx["student"], specs),
        "repeats_done": 1 + max(r["repeat"] for r in runs),
        "summary": report.aggregate(runs),
        "ratios": report.ratios(runs),
        "full_distribution_vs_trl": full_distribution_vs_trl(runs),
        "runs": runs,
        "bench_wall_s": wall_s,
    }
    bl.write_json(args.out, result)
    report.plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    for k, v in result["ratios"]["samples_per_s_ratios"].items():
        log.info("%-52s median %.2f (min %.2f, max %.2f)", k, v["median"], v["min"], v["max"])
    for k, v in result["full_distribution_vs_trl"].items():
        log.info("%-30s / TRL: samples/s %.2f, memory %.2f (goal >= 1, <= 1: %s)", k,
                 v["samples_per_s_ratio"]["median"], v["total_peak_memory_ratio"]["median"], "met" if v["met"] else "NOT met")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
