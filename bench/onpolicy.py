"""On-policy KD (λ = 1) steps/s: asymkd vs TRL GKDTrainer(lmbda=1), same pair, prompts, max_new_tokens,
batch and cores, in one run, A/B alternated.

    python bench/onpolicy.py                # CPU pair of vs_trl.py (teacher ~59M / student ~20M), 3 repeats
    python bench/onpolicy.py --quick        # smoke run (~2 min): tiny pair, 5 steps, 1 repeat
    python bench/onpolicy.py --pair quick --batch-size 4 --max-new-tokens 32   # the tiny pair, measured

Every step of both sides: the student samples `max_new_tokens` per prompt (temperature 1, top_p 1), the
teacher scores prompt + completion, the student takes one optimizer step on the completion tokens. TRL runs
GKDTrainer (`lmbda=1`, β = 1: reverse KL on the full vocabulary, student and teacher in one process)
through bench/trl_onpolicy_run.py in bench/.venv-trl (made by vs_trl.ensure_trl_venv). asymkd runs as a user
runs it: a teacher server (hf backend) + `asymkd train` with `distill.lmbda: 1` on a prompt_completion jsonl,
in these variants (VARIANTS): `sampled_reverse_kl` over TARGET_ONLY (4 bytes per token; the recipe of
on-policy distillation) with the rollout of the next batch overlapping the step (`max_staleness: 1`) and
strictly on-policy (`max_staleness: 0`, TRL's semantics), and `reverse_kl` on top-64 + tail (TRL's
objective, β = 1). The prompts are the ones asymkd's PromptDataset serves, in its order; TRL gets the same
token ids.

Time split per step: TRL's is measured by wrapping its generate and teacher forward (update = the rest);
asymkd's from its metrics.jsonl (ASYMKD_PHASES: with max_staleness >= 1 the rollout runs in a thread
alongside the update; what the training loop waits for is `wait`).

Writes bench/results/onpolicy.json (machine, load averages, every run, medians, ratios to TRL, the goal
asymkd >= 3x TRL's steps/s) and bench/results/onpolicy.png.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/onpolicy.py` from the repo root

from bench import benchlib as bl
from bench import vs_trl
from bench.runner import Placement, record, run_train, tail

log = logging.getLogger("bench.onpolicy")
GOAL = 3.0  # asymkd's on-policy steps/s >= GOAL × TRL's


@dataclass(frozen=True)
class Variant:
    """One measured configuration; kind trl | asymkd."""

    name: str
    kind: str
    loss: str = "sampled_reverse_kl"
    signal: str = "target_only"
    max_staleness: int = 1


VARIANTS = [
    Variant("asymkd_sampled_rkl", "asymkd"),
    Variant("asymkd_sampled_rkl_strict", "asymkd", max_staleness=0),
    Variant("asymkd_topk_rkl", "asymkd", "reverse_kl", "top_k"),
]
TRL = Variant("trl_gkd_lmbda1", "trl")
# Where a step's time goes. TRL (measured by trl_onpolicy_run.py, the parts add up to the step): rollout,
# teacher, update. asymkd (its metrics.jsonl key per part, ms per step; a part absent from a step counts 0):
# rollout = sampling the batch in the rollout thread (off the critical path when max_staleness >= 1), wait =
# the training loop waiting for the scored batch (rollout + teacher, what the overlap did not hide), update =
# forward + backward + optimizer, sync = refreshing the rollout copy of the weights.
ASYMKD_PHASES = {"rollout": "rollout_ms", "wait": "teacher_wait_ms", "update": "update_ms", "sync": "sync_ms"}
CRITICAL_PATH = {"trl": ("rollout", "teacher", "update"), "asymkd": ("wait", "update", "sync")}


# ------------------------------------------------------------------------------------------------ prompts
def write_prompts(path: Path, n: int = 400) -> Path:
    """A prompt_completion jsonl from the docstrings of the standard library (no download): prompt = "Explain
    <name>: <first line>", completion = the rest of the docstring (unused at λ = 1, but a valid record)."""
    recs = []
    for mod in (argparse, collections, json, logging, pathlib, textwrap, inspect, subprocess):
        for name, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if not name.startswith("_") else None
            if doc and len(doc) > 80 and "\n" in doc:
                first, rest = doc.split("\n", 1)
                recs.append({"prompt": f"Explain {mod.__name__}.{name}: {first}", "completion": rest.strip()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:n]))
    return path


def prompt_batches(student: Path, data: dict, batch: int, steps: int, max_new_tokens: int, seed: int):
    """The prompts asymkd's on-policy trainer samples from (its PromptDataset, one rank, its seeded order),
    steps × batch of them, with their dataset completions."""
    from transformers import AutoTokenizer

    from student_trainer.config import DataSection
    from student_trainer.data import load_prompt_documents
    from student_trainer.rollout import PromptDataset

    tok = AutoTokenizer.from_pretrained(student)
    section = DataSection(**data)
    docs = load_prompt_documents(section, tok)
    ds = PromptDataset(
        docs, micro_batch_size=batch, seq_len=section.seq_len, max_new_tokens=max_new_tokens,
        eos_id=tok.eos_token_id, seed=seed, shuffle=section.shuffle,
    )  # fmt: skip
    out = {"prompts": [], "completions": []}
    for i in range(steps):
        b = ds.batch(i)
        out["prompts"] += b["prompts"]
        out["completions"] += [c or [tok.eos_token_id] for c in b["completions"]]
    return out


# -------------------------------------------------------------------------------------------------- runs
def asymkd_config(ctx: dict, args, v: Variant) -> dict:
    """vs_trl's asymkd config (TRL's optimizer defaults, one rank) with on-policy data and distill keys."""
    cfg = vs_trl.asymkd_config(ctx["student"], ctx["pair"], args, beta=1.0, signal=v.signal)
    cfg["data"] = ctx["data"]
    cfg["distill"] = {
        "signal": v.signal, "loss": v.loss, "kd_weight": 1.0, "ce_weight": 0.0,
        "lmbda": 1.0, "max_new_tokens": args.max_new_tokens, "gen_temperature": 1.0, "gen_top_p": 1.0,
        "weight_sync_steps": 1, "max_staleness": v.max_staleness,
    } | ({"top_k": args.top_k} if v.signal == "top_k" else {})  # fmt: skip
    return cfg


def _per_step_s(records: list[dict], key: str) -> float | None:
    """Mean seconds per step of a metrics.jsonl key in ms (steps without it count 0; None: never recorded)."""
    if not any(r.get(key) is not None for r in records):
        return None
    return sum(r.get(key) or 0.0 for r in records) / len(records) / 1e3


def run_asymkd(ctx: dict, args, v: Variant, out: Path, teacher) -> dict:
    tr = run_train(
        asymkd_config(ctx, args, v), out, placement=ctx["placement"], teacher=teacher,
        warmup_steps=args.warmup_steps, timeout_s=args.timeout_s,
    )  # fmt: skip
    if tr.returncode != 0 or tr.step_s_mean is None:
        raise RuntimeError(
            f"asymkd on-policy train failed ({tr.returncode}); is the on-policy trainer (distill.lmbda, "
            f"data.format prompt_completion) in this tree? log {tr.log_path}:\n{tail(tr.log_path)}"
        )
    timed = tr.train_records[args.warmup_steps :]
    split = {part: _per_step_s(timed, key) for part, key in ASYMKD_PHASES.items()}
    if split["rollout"] is None:
        raise RuntimeError(f"no rollout_ms in {out / 'metrics.jsonl'}: did asymkd train on-policy (lmbda=1)?")
    tokens = sum(r["tokens"] for r in timed) / len(timed)
    return tr.summary() | {"steps_per_s": 1.0 / tr.step_s_mean, "phase_s_mean": split,
                           "completion_tokens_per_step": tokens,
                           "staleness_max": max(r.get("staleness") or 0 for r in timed)}  # fmt: skip


def run_trl(ctx: dict, args, out: Path) -> dict:
    pair = ctx["pair"]
    cmd = [str(ctx["trl_py"]), str(bl.BENCH_DIR / "trl_onpolicy_run.py"), "--teacher", str(ctx["teacher"])]
    cmd += ["--student", str(ctx["student"]), "--prompts", str(ctx["prompts"]), "--steps", str(args.steps)]
    cmd += ["--batch-size", str(pair.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--beta", "1.0", "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps)]
    cmd += [
        "--seed",
        str(args.seed),
        "--device",
        pair.device,
        "--dtype",
        pair.dtype,
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path = out / "trl.log"
    with log_path.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed ({proc.returncode}); log {log_path}:\n{tail(log_path)}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.pop("losses", None)
    return res | {"total_peak_mb": res["peak_rss_mb"]}


def run_repeat(rep: int, ctx: dict, args, servers: vs_trl.Servers) -> list[dict]:
    """One repeat: TRL and the asymkd variants, the order reversed every other repeat (A/B, B/A). The
    teacher server is up only while asymkd runs (it is stopped before TRL's run)."""
    order = [TRL, *args.variants] if rep % 2 == 0 else [*args.variants, TRL]
    rows = []
    for v in order:
        out = ctx["work"] / f"r{rep}" / v.name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if v.kind == "trl":
            servers.close()
            res = run_trl(ctx, args, out)
        else:
            teacher = servers.get(("hf", "shared", "onpolicy"), out)
            res = run_asymkd(ctx, args, v, out, teacher)
        rows.append(record(v, rep, res, time.perf_counter() - t0, log))
    servers.close()
    return rows


# ------------------------------------------------------------------------------------------------ report
def aggregate(runs: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        parts = dict.fromkeys(p for r in mine for p in r["phase_s_mean"])
        out[name] = {
            "kind": mine[0]["kind"],
            "steps_per_s": bl.summarize([r["steps_per_s"] for r in mine]),
            "samples_per_s": bl.summarize([r["samples_per_s"] for r in mine]),
            "completion_tokens_per_step": bl.summarize([r.get("completion_tokens_per_step") for r in mine]),
            "phase_s_mean": {p: bl.summarize([r["phase_s_mean"].get(p) for r in mine]) for p in parts},
        }
    return out


def ratios(runs: list[dict]) -> dict:
    """Each asymkd variant's steps/s over TRL's of the same repeat; `met`: median >= GOAL."""
    trl = {r["repeat"]: r["steps_per_s"] for r in runs if r["kind"] == "trl"}
    out = {}
    for name in dict.fromkeys(r["name"] for r in runs if r["kind"] == "asymkd"):
        vals = [r["steps_per_s"] / trl[r["repeat"]] for r in runs if r["name"] == name and r["repeat"] in trl]
        s = bl.summarize(vals)
        out[name] = s | {"goal": GOAL, "met": s["median"] is not None and s["median"] >= GOAL}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ, rat = result["summary"], result["ratios_vs_trl"]
    names = list(summ)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    med = [summ[n]["steps_per_s"]["median"] for n in names]
    err = [[m - summ[n]["steps_per_s"]["min"] for n, m in zip(names, med, strict=True)],
           [summ[n]["steps_per_s"]["max"] - m for n, m in zip(names, med, strict=True)]]  # fmt: skip
    colors = ["tab:gray" if n.startswith("trl") else "tab:blue" for n in names]
    ax1.bar(range(len(names)), med, yerr=err, color=colors, capsize=4)
    for i, n in enumerate(names):
        if n in rat and rat[n]["median"] is not None:
            top = summ[n]["steps_per_s"]["max"]
            ax1.annotate(f"{rat[n]['median']:.2f}× TRL", (i, top), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("optimizer steps/s (median, min–max)")
    ax1.set_title(f"on-policy λ=1, goal ≥ {GOAL:g}× TRL")
    colors = {"rollout": "tab:orange", "teacher": "tab:green", "wait": "tab:olive", "update": "tab:purple",
              "sync": "tab:brown"}  # fmt: skip
    for i, n in enumerate(names):
        bottom = 0.0
        for part in CRITICAL_PATH[summ[n]["kind"]]:
            val = (summ[n]["phase_s_mean"].get(part) or {}).get("median") or 0.0
            first = part not in ax2.get_legend_handles_labels()[1]
            ax2.bar(i, val, width=0.5, bottom=bottom, color=colors[part], label=part if first else None)
            bottom += val
        if summ[n]["kind"] == "asymkd":  # the rollout thread's own time, beside the critical path
            roll = summ[n]["phase_s_mean"]["rollout"]["median"] or 0.0
            ax2.bar(i + 0.35, roll, width=0.2, color=colors["rollout"], hatch="//", alpha=0.6)
    ax2.plot(range(len(names)), [1 / m for m in med], "k_", markersize=20, label="step time")
    ax2.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("s per step (asymkd: hatched = rollout thread)")
    ax2.set_title("time split per step (critical path)")
    ax2.legend(fontsize=8)
    load = result["machine"]["load_average_1_5_15"]
    cfg = result["config"]
    threads = cfg.get("torch_threads_per_process", "torch default")
    title = f"{cfg['pair']} pair, batch {cfg['batch_size']}, {cfg['max_new_tokens']} new tokens"
    title += f", threads {threads}"
    fig.suptitle(f"{title}; load avg at start {load}", fontsize=9)
    bl.save_figure(fig, path)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny pair, batch 2, 16 new tokens, 5 steps"
    )
    p.add_argument(
        "--pair", choices=sorted(vs_trl.PAIRS), default=None, help="vs_trl.py's pairs (default cpu)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: the pair's)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (TRL; asymkd trainer, teacher); 0 = default",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 12; quick 5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out (default 3; quick 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (quick 16)")
    p.add_argument("--variants", nargs="+", default=None, choices=[v.name for v in VARIANTS],
                   help="asymkd variants (default all)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per asymkd run")
    p.add_argument("--max-load", type=float, default=1.5, help="warn when the 1-min load average is above")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/onpolicy.json)")
    args = p.parse_args(argv)
    args.pair = args.pair or ("quick" if args.quick else "cpu")
    args.steps = args.steps or (5 if args.quick else 12)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3)
    args.max_new_tokens = args.max_new_tokens or (16 if args.quick else 64)
    names = args.variants or [v.name for v in VARIANTS]
    args.variants = [v for v in VARIANTS if v.name in names]
    if args.quick and args.repeats == p.get_default("repeats"):
        args.repeats = 1
    if args.out is None:  # a smoke run never overwrites the published results
        args.out = bl.cache_root() / "onpolicy_quick.json" if args.quick else bl.RESULTS_DIR / "onpolicy.json"
    args.serve_args = []  # vs_trl.Servers reads it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    pair = vs_trl.PAIRS[args.pair]
    pair = dataclasses.replace(pair, batch_size=args.batch_size or pair.batch_size)
    teacher, student = vs_trl.build_pair(pair)
    work = bl.cache_root() / "runs" / f"onpolicy-{pair.name}"
    n = args.threads
    placement = Placement(f"threads{n}", teacher_threads=n, student_threads=n) if n else Placement.shared()
    seq_len = 64 + args.max_new_tokens  # prompts keep their last 64 tokens
    data = {"paths": [str(write_prompts(work / "prompts.jsonl"))], "format": "prompt_completion",
            "seq_len": seq_len, "shuffle": True}  # fmt: skip
    batches = prompt_batches(student, data, pair.batch_size, args.steps, args.max_new_tokens, args.seed)
    (work / "trl_prompts.json").write_text(json.dumps(batches))
    ctx = {"pair": pair, "teacher": teacher, "student": student, "work": work, "data": data,
           "prompts": work / "trl_prompts.json", "trl_py": vs_trl.ensure_trl_venv(),
           "placement": placement, "placements": {"shared": placement}}  # fmt: skip
    servers, runs, t0 = vs_trl.Servers(ctx, args), [], time.perf_counter()
    try:
        for rep in range(args.repeats):
            runs += run_repeat(rep, ctx, args, servers)
            write_results(args, argv, ctx, runs, load0, time.perf_counter() - t0)  # after every repeat
    finally:
        servers.close()
    return 0


def write_results(args, argv, ctx: dict, runs: list[dict], load0: float, wall_s: float) -> None:
    machine = bl.machine_info({"trl": vs_trl.TRL_VERSION}) | {"load_average_1m_at_start": round(load0, 2)}
    machine["load_average_1m_after_each_run"] = [r["load_average_1m"] for r in runs]
    pair = ctx["pair"]
    result = {
        "benchmark": "onpolicy",
        "command": "python bench/onpolicy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "config": {
            "pair": pair.name,
            "teacher": vars(pair.teacher),
            "student": vars(pair.student),
            "teacher_params_m": bl.count_params(ctx["teacher"]) / 1e6,
            "student_params_m": bl.count_params(ctx["student"]) / 1e6,
            "batch_size": pair.batch_size,
            "torch_threads_per_process": args.threads or "torch default",
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "warmup_steps_excluded": args.warmup_steps,
            "repeats": args.repeats,
            "lr": args.lr,
            "precision": pair.dtype,
            "device": pair.device,
            "variants": [vars(v) for v in [TRL, *args.variants]],
            "data": ctx["data"],
            "sampling": "temperature 1, top_p 1 on both sides; TRL: GKDTrainer lmbda=1, beta=1, top_k=0",
        },
        "repeats_done": 1 + max(r["repeat"] for r in runs),
        "summary": aggregate(runs),
        "ratios_vs_trl": ratios(runs),
        "runs": runs,
        "bench_wall_s": wall_s,
    }
    bl.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    for name, s in result["summary"].items():
        ph = {k: v["median"] for k, v in s["phase_s_mean"].items()}
        log.info("%-28s %s steps/s  split s/step %s", name, bl.fmt_summary(s["steps_per_s"], 3), ph)
    for name, r in result["ratios_vs_trl"].items():
        log.info(
            "%-28s / TRL: %s (goal >= %g: %s)",
            name,
            bl.fmt_summary(r),
            GOAL,
            "met" if r["met"] else "NOT met",
        )


if __name__ == "__main__":
    sys.exit(main())
