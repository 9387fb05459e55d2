"""Does distillation pay for itself? CE-only vs KD students at equal steps and at equal wall-clock.

    python bench/quality.py                    # SmolLM2-135M-Instruct teacher -> ~17M student, ~15 min on 2 idle cores
    python bench/quality.py --quick            # smoke run (a few steps)
    python bench/quality.py --signals top_k full
    python bench/quality.py --train-docs 600 --steps 300 --cache --out bench/results/quality_limited.json
                                               # data-limited: ~5 epochs over 600 documents, KD from an
                                               # offline cache written first (its time counts for KD)

Everything trains through the product: a teacher server (LocalTeacher, hf backend) and `asymkd train` with a
YAML config; the data is the trainer's builtin `stdlib-docs` corpus with a held-out share of its documents
(`data.eval_fraction`). Runs, in order:
  1. ce      — CE-only student, N steps;
  2. kd_<s>  — KD students (forward KL, T = 1) for each signal s: top_k (top-64 + exact tail bucket), full;
  3. ce_wall — the CE run continued (`checkpoint.resume`) to M steps, M chosen so that its training clock
               equals the first KD run's: the equal-wall-clock baseline.
The LR schedule is constant after a warmup, so the first N steps of ce_wall *are* the run `ce` (one run
serves both comparisons, resumed exactly). Training clock = time inside the training loop (teacher waits
included; start-up, the final export and checkpoint excluded) minus the evaluations, each counted at the
duration a standalone evaluation takes at most (so the teacher's prefetch during an evaluation is not free
time).

Afterwards every final student and the teacher are scored on the whole held-out split: CE against the true
next tokens and KL(teacher ‖ student) over the full vocabulary. Writes bench/results/quality.json and
bench/results/quality.png (held-out CE vs steps and vs training clock, final CE and KL).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/quality.py` from the repo root

from bench import benchlib as bl
from bench import quality_report as report
from bench.runner import Placement, TrainResult, run_train, start_teacher, tail, write_cache

log = logging.getLogger("bench.quality")


# ------------------------------------------------------------------------------------------------ config
def base_config(args, teacher_dir: Path, eval_batches: int, data: dict) -> dict:
    """The student and recipe shared by every run; only the distill/teacher sections differ."""
    return {
        "model": {
            "tokenizer": str(teacher_dir), "hidden_size": args.hidden_size, "num_layers": args.num_layers,
            "num_heads": args.hidden_size // 64, "intermediate_size": 4 * args.hidden_size,
            "tie_word_embeddings": True, "max_position_embeddings": max(512, args.seq_len),
        },
        "data": data,
        "optim": {
            "lr": args.lr, "warmup_steps": args.lr_warmup_steps, "schedule": "constant", "weight_decay": 0.1,
            "grad_clip": 1.0, "micro_batch_size": args.batch_size,
        },
        "parallel": {"device": "cpu"},
        "distill": {"loss": "forward_kl", "temperature": 1.0, "kd_weight": 1.0 - args.ce_weight,
                    "ce_weight": args.ce_weight, "top_k": args.top_k},
        "teacher": {"prefetch": args.prefetch, "timeout_s": 900.0},  # generous: the cores may be shared
        "checkpoint": {"export": True},
        "metrics": {"log_every": 10},
        "run": {"steps": args.steps, "seed": args.seed, "eval_every": args.eval_every, "eval_batches": eval_batches},
    }  # fmt: skip


def data_section(args) -> dict:
    """The trainer's `data` section: the builtin corpus with its held-out share, or (``--train-docs N``, the
    data-limited regime) N of its training documents written to a JSONL file, held out the same documents."""
    if not args.train_docs:
        return {"builtin": "stdlib-docs", "seq_len": args.seq_len, "eval_fraction": args.eval_fraction}
    import numpy as np

    from student_trainer.data import split_documents, stdlib_docs_corpus

    docs = stdlib_docs_corpus().read_text().splitlines()
    train_docs, held_docs = split_documents(docs, args.eval_fraction)  # the trainer's own split of documents
    if args.train_docs > len(train_docs):
        raise SystemExit(
            f"--train-docs {args.train_docs}: the corpus has {len(train_docs)} training documents"
        )
    pick = sorted(np.random.default_rng(args.seed).permutation(len(train_docs))[: args.train_docs].tolist())
    folder = bl.cache_root() / "corpora"
    folder.mkdir(parents=True, exist_ok=True)
    train_path = folder / f"stdlib-docs-train{args.train_docs}-seed{args.seed}.jsonl"
    held_path = folder / f"stdlib-docs-heldout{args.eval_fraction}.jsonl"
    for path, lines in ((train_path, [train_docs[i] for i in pick]), (held_path, held_docs)):
        text = "\n".join(lines) + "\n"
        if not path.exists() or path.read_text() != text:  # unchanged files keep the trainer's packs valid
            path.write_text(text)
    return {"paths": [str(train_path)], "eval_path": [str(held_path)], "seq_len": args.seq_len}


def eval_rows(data_cfg: dict, teacher_dir: Path) -> dict:
    """The held-out rows the trainer evaluates on (its own split and packing)."""
    from transformers import AutoTokenizer

    from asymkd.contract import tokenizer_hash
    from student_trainer.config import DataSection
    from student_trainer.data import load_packs

    data = DataSection(**data_cfg)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    packs = load_packs(data, tok, tokenizer_hash(teacher_dir) or str(teacher_dir.resolve()))
    return {"train_rows": len(packs["train"]), "eval": packs["eval"]}


# -------------------------------------------------------------------------------------------------- runs
def train(
    name: str, cfg: dict, work: Path, args, teacher_dir: Path | None, signal: str | None
) -> TrainResult:
    cfg = {**cfg, "distill": {**cfg["distill"]}}
    if signal is not None:
        cfg["distill"]["signal"] = signal
        if signal != "top_k":
            cfg["distill"].pop("top_k")
    t0, shared, cache_s = time.perf_counter(), Placement.shared(), 0.0
    if teacher_dir is None:
        res = run_train(cfg, work / name, placement=shared, warmup_steps=1)
    else:
        cached = args.cache and signal == "top_k"  # score every row once, then train with no teacher
        with start_teacher(
            teacher_dir, "hf", shared, work / name / "teacher.log", dtype=args.teacher_dtype
        ) as t:
            if cached:
                cache_dir = work / name / "teacher_cache"
                cache_s = write_cache(cfg, work / name, cache_dir, placement=shared, teacher=t)
            else:
                res = run_train(cfg, work / name, placement=shared, teacher=t, warmup_steps=1)
        if cached:
            log.info("%-8s cache of every training row written in %.0f s", name, cache_s)
            cfg["teacher"] = {**cfg["teacher"], "cache": str(cache_dir)}
            res = run_train(cfg, work / name, placement=shared, warmup_steps=1)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: asymkd train failed ({res.returncode}):\n{tail(res.log_path)}")
    log.info("%-8s %d steps in %.0f s (process wall)", name, res.steps, time.perf_counter() - t0)
    res.cache_write_s = cache_s  # the teacher's cost paid before training (0 with a live teacher)
    return res


def eval_durations(res: TrainResult) -> list[float]:
    """Seconds each in-run evaluation took: from the train record before it to the eval record."""
    out, prev = [], None
    for rec in sorted(res.train_records + res.eval_records, key=lambda r: (r["time"], r["kind"] != "train")):
        if rec["kind"] == "eval" and prev is not None:
            out.append(rec["time"] - prev)
        prev = rec["time"] if rec["kind"] == "train" else prev
    return out


def clocked_curve(res: TrainResult, eval_cost_s: float, offset_s: float = 0.0) -> list[dict]:
    """Eval points with their training clock: loop time up to the eval's step minus the earlier
    evaluations, each at most `eval_cost_s` (see the module docstring), plus `offset_s` (a resumed run)."""
    t_start = res.train_records[0]["time"] - res.train_records[0]["step_time_s"]
    step_time = {r["step"]: r["time"] for r in res.train_records}
    durations = eval_durations(res)
    points: list[dict] = []
    for i, rec in enumerate(sorted(res.eval_records, key=lambda r: r["time"])):
        if any(p["step"] == rec["step"] for p in points):
            continue  # the final evaluation is logged twice when the last step is also an eval_every step
        charged = sum(min(d, eval_cost_s) for d in durations[:i])
        clock = step_time[rec["step"]] - t_start - charged
        points.append({"step": rec["step"], "clock_s": offset_s + clock, "eval_loss": rec["eval_loss"]})
    return points


def train_clock(res: TrainResult, eval_cost_s: float) -> float:
    """The training clock at the last step (evaluations before it charged at most `eval_cost_s` each)."""
    t_start = res.train_records[0]["time"] - res.train_records[0]["step_time_s"]
    last = res.train_records[-1]
    before = sorted(r["time"] for r in res.eval_records if r["step"] < last["step"])
    durations = eval_durations(res)[: len(before)]
    return last["time"] - t_start - sum(min(d, eval_cost_s) for d in durations)


def summarize_run(res: TrainResult, eval_cost_s: float, offset_s: float = 0.0) -> dict:
    return {
        "steps": res.train_records[-1]["step"],
        "train_clock_s": offset_s + train_clock(res, eval_cost_s),
        "process_wall_s": res.wall_s,
        "trainer_peak_mb": res.trainer_peak_mb,
        "teacher_peak_mb": res.teacher_peak_mb,
        "teacher_wait_ms_mean": res.teacher_wait_ms_mean,
        "final_train_loss": res.final.get("loss"),
        "curve": clocked_curve(res, eval_cost_s, offset_s),
        "train_loss_every_10": [r["loss"] for r in res.train_records[::10]],
    }


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 12 steps, small held-out share")
    p.add_argument("--steps", type=int, default=None, help="N, the KD run's steps (default 100; quick 12)")
    p.add_argument("--signals", nargs="+", default=["top_k"], choices=["top_k", "full"])
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--ce-weight", type=float, default=0.0, help="KD runs: loss = (1-w)·KD + w·CE")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-warmup-steps", type=int, default=None, help="default: 10%% of N")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument(
        "--train-docs",
        type=int,
        default=0,
        help="data-limited regime: train on this many documents of the corpus (0 = all), same held-out set",
    )
    p.add_argument("--eval-every", type=int, default=None, help="default: N/8")
    p.add_argument("--eval-max-batches", type=int, default=12, help="in-run evaluation size (micro-batches)")
    p.add_argument("--heldout-rows", type=int, default=96, help="rows scored at the end (CE and KL)")
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument(
        "--cache",
        action="store_true",
        help="top_k KD from an offline cache (`asymkd cache write`, every row scored once; its time counts)",
    )
    p.add_argument(
        "--teacher-dtype",
        default="bfloat16",
        choices=["float32", "bfloat16"],
        help="bf16: the checkpoint's own precision",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/quality.json)")
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 100)
    args.eval_every = args.eval_every or max(1, args.steps // (3 if args.quick else 8))
    if args.quick:
        args.eval_max_batches, args.heldout_rows = min(args.eval_max_batches, 4), min(args.heldout_rows, 16)
    if args.lr_warmup_steps is None:
        args.lr_warmup_steps = max(1, args.steps // 10)
    if args.out is None:
        args.out = bl.cache_root() / "quality_quick.json" if args.quick else bl.RESULTS_DIR / "quality.json"
    return args


def main(argv: list[str] | None = None) -> int:
    from teacher_server.models import default_teacher_dir

    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    teacher_dir = default_teacher_dir()
    work = bl.cache_root() / "runs" / ("quality-quick" if args.quick else "quality")
    data = data_section(args)  # once: it may write the data-limited corpus files
    held = eval_rows(data, teacher_dir)
    eval_batches = max(1, min(args.eval_max_batches, len(held["eval"]) // args.batch_size))
    cfg = base_config(args, teacher_dir, eval_batches, data)
    t0 = time.perf_counter()

    ce = train("ce", cfg, work, args, None, None)
    cost = sorted(eval_durations(ce))
    eval_cost = cost[len(cost) // 2] if cost else 0.0
    kd = {s: train(f"kd_{s}", cfg, work, args, teacher_dir, s) for s in args.signals}
    ce_per_step = train_clock(ce, eval_cost) / args.steps
    first_kd = kd[args.signals[0]]
    kd_clock = first_kd.cache_write_s + train_clock(first_kd, eval_cost)  # the cache's writing counts
    m_steps = max(args.steps, round(kd_clock / ce_per_step))
    log.info("equal wall-clock: CE continues to %d steps (%.2f s/step CE vs %.2f s/step KD, cache included)",
             m_steps, ce_per_step, kd_clock / args.steps)  # fmt: skip
    wall_cfg = {**cfg, "run": {**cfg["run"], "steps": m_steps}}
    wall_cfg["checkpoint"] = {
        "export": True,
        "resume": str(work / "ce" / "checkpoints" / f"step_{args.steps:07d}"),
    }
    ce_wall = train("ce_wall", wall_cfg, work, args, None, None) if m_steps > args.steps else None

    runs = {"ce": summarize_run(ce, eval_cost)}
    runs |= {f"kd_{s}": summarize_run(r, eval_cost, offset_s=r.cache_write_s) for s, r in kd.items()}
    for s, r in kd.items():
        runs[f"kd_{s}"]["cache_write_s"] = r.cache_write_s
    if ce_wall is not None:
        runs["ce_wall"] = summarize_run(ce_wall, eval_cost, offset_s=runs["ce"]["train_clock_s"])
    students = {name: work / name / "final" for name in runs}
    heldout = report.score_heldout(teacher_dir, students, held["eval"], max_rows=args.heldout_rows)
    result = {
        "benchmark": "quality",
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": bl.machine_info() | {"load_average_1m_at_start": round(load0, 2)},
        "config": {
            "teacher": str(teacher_dir.name), "teacher_params_m": bl.count_params(teacher_dir) / 1e6,
            "student_params_m": bl.count_params(students["ce"]) / 1e6, "steps_N": args.steps, "steps_M": m_steps,
            "train_rows": held["train_rows"], "heldout_rows": len(held["eval"]), "eval_cost_s": eval_cost,
            "in_run_eval_batches": eval_batches, "trainer_config": cfg, "signals": args.signals,
            "train_docs": args.train_docs or "all", "teacher_cache": args.cache,
        },
        "runs": runs,
        "heldout": heldout,
        "comparisons": report.comparisons(heldout, args.signals),
        "bench_wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    result["machine"]["load_average_1m_at_end"] = round(bl.load_average_1m(), 2)
    bl.write_json(args.out, result)
    report.plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    for k, v in result["comparisons"].items():
        log.info("%-40s %s", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
