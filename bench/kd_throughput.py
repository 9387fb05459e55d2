"""KD throughput: asymkd (teacher service) vs sequential KD in one process vs the CE-only student.

    python bench/kd_throughput.py                  # CPU pair (teacher ~59M / student ~20M, vocab 49,152), 3 repeats
    python bench/kd_throughput.py --quick          # smoke run: tiny pair, few steps, 1 repeat
    python bench/kd_throughput.py --split-cores    # also: teacher on half the cores, student on the rest
    python bench/kd_throughput.py --gpu            # GPU pair (~1.2B-config teacher / ~120M student), bf16

The same teacher/student pair, data (the trainer's packed `stdlib-docs` rows in its seeded order), optimizer,
steps and loss (top-64 + tail bucket, forward KL) in every variant, all through `asymkd train`:
  (a) ce_only      — the CE-only student (no teacher): what the student alone costs;
  (b) asymkd_kd    — a teacher server (LocalTeacher, hf backend) + `asymkd train` with teacher.targets:
                     the teacher scores batches i+1..i+prefetch while the student trains on batch i;
  (c) inprocess_kd  — `asymkd train` with teacher.in_process: the same backend class in the training process,
                     each micro-batch scored (teacher forward) then trained on: the symmetric baseline;
  teacher_alone    — a teacher server scoring the same batches through score_stream, nothing else running.
Sequential bound per repeat: 1/(1/(a) + 1/teacher_alone), what (c) can reach at best. Targets (issue 3):
(b) ≥ 0.9 × the sequential bound; (b)'s trainer peak memory ≤ 1.1 × (a)'s. One repeat runs every variant
back to back (in reverse order on odd repeats, so none always runs first); ratios are paired by repeat.

Writes bench/results/kd_throughput.json (the machine described, every run, medians/min/max, ratios, targets)
and bench/results/kd_throughput.png; run folders (configs, logs, metrics.jsonl) under
$ASYMKD_CACHE/bench/runs/kd_throughput-<pair>/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/kd_throughput.py` from the root

from asymkd.config import load_config
from bench import benchlib as bl
from bench import kd_throughput_report as report
from bench.runner import Placement, measure, record, start_teacher
from bench.vs_trl import PAIRS, asymkd_config, build_pair, training_batches
from student_trainer.config import InProcessTeacherSection

log = logging.getLogger("bench.kd_throughput")


@dataclass(frozen=True)
class RunSpec:
    """One measurement: kind ce | served | in_process | teacher, on shared cores or split ones."""

    name: str
    kind: str
    placement: str = "shared"


def plan(args: argparse.Namespace) -> list[RunSpec]:
    runs = [
        RunSpec(report.CE, "ce"),
        RunSpec(report.SERVED, "served"),
        RunSpec(report.IN_PROCESS, "in_process"),
        RunSpec(report.TEACHER, "teacher"),
    ]
    if args.split_cores:  # (c) is one process: it has nothing to split
        runs += [
            RunSpec(f"{report.CE}_split", "ce", "split"),
            RunSpec(f"{report.SERVED}_split", "served", "split"),
            RunSpec(f"{report.TEACHER}_split", "teacher", "split"),
        ]
    return runs


def train_config(ctx: dict, args, kind: str) -> dict:
    """vs_trl's asymkd recipe (TRL's optimizer defaults, one rank, no export), with forward KL on top-k."""
    pair = ctx["pair"]
    cfg = asymkd_config(ctx["student"], pair, args, beta=0.0, signal=None if kind == "ce" else "top_k")
    cfg["distill"]["loss"] = "forward_kl"
    if kind == "in_process":  # the server's flags, as the `asymkd serve` keys of the in-process teacher
        serve_args = ["--model", str(ctx["teacher"]), "--dtype", pair.dtype, *args.serve_args]
        in_process = load_config(InProcessTeacherSection, None, serve_args)
        cfg["teacher"] |= {"in_process": dataclasses.asdict(in_process)}
    return cfg


def run_one(spec: RunSpec, ctx: dict, repeat: int, args) -> dict:
    out = ctx["work"] / f"r{repeat}" / spec.name
    out.mkdir(parents=True, exist_ok=True)
    placement, pair = ctx["placements"][spec.placement], ctx["pair"]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        teacher = None
        if spec.kind in ("served", "teacher"):  # a fresh server per run: its peak memory is this run's
            serve = ["--device", pair.device, *args.serve_args]
            teacher = stack.enter_context(
                start_teacher(
                    ctx["teacher"], "hf", placement, out / "teacher.log", dtype=pair.dtype, extra_args=serve
                )
            )
        cfg = None if spec.kind == "teacher" else train_config(ctx, args, spec.kind)
        res = measure(
            spec.kind, cfg, out, teacher=teacher, placement=placement, batches=ctx["batches"], args=args
        )
    return record(spec, repeat, res, time.perf_counter() - t0, log)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny pair, batch 2 × 128, 5 steps, 1 repeat"
    )
    p.add_argument("--gpu", action="store_true", help="the GPU pair, bf16 on cuda (needs a GPU)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the whole sequence of variants")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 16; quick 5)")
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out (default 3; quick 2)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=4, help="(b): batches in flight to the teacher")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-cores", action="store_true", help="also: teacher and student on separate cores")
    p.add_argument("--max-load", type=float, default=1.5, help="warn when the 1-min load average is above")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kd_throughput.json)"
    )
    p.add_argument(
        "--serve-args", nargs=argparse.REMAINDER, default=[],
        help="extra `asymkd serve` flags (last), given to the server of (b) and the in-process teacher of (c)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.pair = "gpu" if args.gpu else "quick" if args.quick else "cpu"
    args.steps = args.steps or (5 if args.quick else 16)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3)
    if args.quick and args.repeats == p.get_default("repeats"):
        args.repeats = 1
    if args.out is None:  # a smoke run never overwrites the published results
        name = "kd_throughput_quick.json" if args.quick else "kd_throughput.json"
        args.out = (bl.cache_root() if args.quick else bl.RESULTS_DIR) / name
    return args


def describe(args, ctx: dict, specs: list[RunSpec]) -> dict:
    pair, teacher, student = ctx["pair"], ctx["teacher"], ctx["student"]
    return {
        "pair": pair.name, "teacher": vars(pair.teacher), "student": vars(pair.student),
        "teacher_params_m": bl.count_params(teacher) / 1e6, "student_params_m": bl.count_params(student) / 1e6,
        "vocab_size": 49152, "batch_size": pair.batch_size, "seq_len": pair.seq_len, "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps, "repeats": args.repeats, "top_k": args.top_k,
        "loss": "forward_kl (top-k + tail bucket)", "prefetch": args.prefetch, "lr": args.lr,
        "precision": pair.dtype, "device": pair.device, "teacher_backend": "hf", "serve_args": args.serve_args,
        "split_cores": args.split_cores, "order_of_one_repeat": [s.name for s in specs],
        "order_note": "odd repeats run the variants in reverse order",
        "data": "builtin stdlib-docs corpus: asymkd's packed rows in its seeded order, the same in every variant",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    pair = PAIRS[args.pair]
    teacher, student = build_pair(pair)
    work = bl.cache_root() / "runs" / f"kd_throughput-{pair.name}"
    work.mkdir(parents=True, exist_ok=True)
    placements = {"shared": Placement.shared()} | ({"split": Placement.split()} if args.split_cores else {})
    ctx = {"pair": pair, "teacher": teacher, "student": student, "work": work, "placements": placements,
           "batches": training_batches(student, pair, args.steps, args.seed)}  # fmt: skip
    specs, runs = plan(args), []
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for spec in specs if rep % 2 == 0 else specs[::-1]:
            runs.append(run_one(spec, ctx, rep, args))
        write_results(args, argv, ctx, specs, runs, load0, time.perf_counter() - t0)  # after every repeat
    return 0


def write_results(args, argv, ctx: dict, specs: list[RunSpec], runs: list[dict], load0: float, wall_s: float):
    machine = bl.machine_info() | {"load_average_1m_at_start": round(load0, 2)}
    machine["load_average_1m_after_each_run"] = bl.summarize([r["load_average_1m"] for r in runs])
    result = {
        "benchmark": "kd_throughput",
        "command": "python bench/kd_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "config": describe(args, ctx, specs),
        "repeats_done": 1 + max(r["repeat"] for r in runs),
        "summary": report.summarize(runs),
        "ratios": report.ratios(runs),
        "runs": runs,
        "bench_wall_s": wall_s,
    }
    bl.write_json(args.out, result)
    report.plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s\n%s", args.out, args.out.with_suffix(".png"), report.as_table(result))


if __name__ == "__main__":
    sys.exit(main())
