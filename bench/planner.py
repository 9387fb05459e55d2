"""Planner check: the cost model's predicted samples/s (after `--calibrate`) vs measured, on this machine.

    python bench/planner.py              # CPU pair (teacher ~59M / student ~20M, vocab 49,152), 2 repeats
    python bench/planner.py --quick      # tiny pair, 5 steps, 1 repeat (smoke: the numbers mean little)

The machine is planned as a one-node cluster whose "GPUs" are its cores (what `asymkd plan --calibrate` does
without a GPU): the matmul rate of one core, a memcpy, and a loopback gloo pair are measured, then every
configuration below is run for real and predicted by asymkd/planner/cost.py:

- teacher_tp1 / teacher_tp2: `asymkd serve --backend vllm`, TP=1 pinned to core 0 / TP=2 on both cores,
  scoring the training batches through score_stream with `prefetch` in flight (1 / 2 devices);
- student_1 / student_2: `asymkd train` CE-only, 1 rank on core 1 / torchrun 2 ranks (FSDP), 1 thread each;
- split: teacher_tp1's server on core 0 + `asymkd train` KD (top-k) on core 1 (1 + 1 devices);
- symmetric: torchrun 2 ranks with `teacher.in_process` (hf): each rank scores, then trains (2 devices).

The model has two efficiencies (fractions of the measured matmul rate): `teacher_mfu` (the served teacher's
forward) and `mfu` (a training step, and the in-process teacher's forward). They are fitted on teacher_tp1
and student_1 (one device each) and then held fixed: the other four configurations are predictions, checked
against ±25%. One repeat runs teacher_tp1 → split → symmetric → student_1 → student_2 → teacher_tp2, the next
the reverse (each compared pair back to back, A/B then B/A). The 1-min load average is recorded at the start,
after every run and at the end. Writes bench/results/planner.json and bench/results/planner.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/planner.py` from the root

import yaml

from asymkd.config import load_config
from asymkd.planner.calibrate import calibrate
from asymkd.planner.cluster import build_inputs
from asymkd.planner.config import PlanConfig
from asymkd.planner.cost import (
    StudentLayout,
    TeacherLayout,
    _symmetric_one,
    student_cost,
    teacher_cost,
    transport_samples_per_s,
)
from asymkd.planner.presets import GpuSpec, resolve_model
from bench import benchlib as bl
from bench.runner import pinned, steady_window, tail, teacher_alone
from bench.vs_trl import PAIRS, asymkd_config, build_pair, training_batches
from student_trainer.config import InProcessTeacherSection
from teacher_server.backends.vllm import omp_threads_bind

log = logging.getLogger("bench.planner")
KV_BYTES = str(512 << 20)
FIT = {"teacher_tp1": "teacher_mfu", "student_1": "mfu"}
ORDER = ["teacher_tp1", "split", "symmetric", "student_1", "student_2", "teacher_tp2"]
CORE_T, CORE_S = frozenset({0}), frozenset({1})


# ------------------------------------------------------------------------------------------------- runs
@contextlib.contextmanager
def vllm_teacher(ctx: dict, tp: int, cores: frozenset[int] | None, log_path: Path):
    """An `asymkd serve --backend vllm` child pinned to `cores` (all when None), TP workers bound one each."""
    from teacher_server.launch import LocalTeacher

    allowed = sorted(cores or os.sched_getaffinity(0))
    args = ["--model", str(ctx["teacher"]), "--backend", "vllm", "--dtype", "float32", "--max-top-k", "64"]
    args += [
        "--vllm.kv-cache-memory-bytes",
        KV_BYTES,
        "--vllm.enforce-eager",
        "--tensor-parallel-size",
        str(tp),
    ]
    env = {"VLLM_CPU_OMP_THREADS_BIND": omp_threads_bind(tp, allowed), "VLLM_LOGGING_LEVEL": "WARNING"}
    teacher = LocalTeacher(args, log_path=log_path, env=env, start_timeout_s=600)
    with pinned(cores):
        teacher.start()
    try:
        yield teacher
    finally:
        teacher.stop()


def train_config(ctx: dict, args, *, kd: bool, in_process: bool = False) -> dict:
    cfg = asymkd_config(ctx["student"], ctx["pair"], args, beta=0.0, signal="top_k" if kd else None)
    cfg["distill"]["loss"] = "forward_kl"
    if in_process:
        serve = load_config(
            InProcessTeacherSection, None, ["--model", str(ctx["teacher"]), "--dtype", "float32"]
        )
        cfg["teacher"] |= {"in_process": dataclasses.asdict(serve)}
    return cfg


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    total = 0.0
    for p in [pid, *bl._descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_train(
    cfg: dict, out: Path, *, nproc: int, cores: frozenset[int] | None, targets: list[str], warmup: int
) -> tuple[float, float, float]:
    """`asymkd train` (torchrun for nproc > 1), 1 thread per rank: (samples/s after the warm-up steps, CPU
    seconds of the whole process tree, its wall seconds)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["run"]["out_dir"] = str(out)
    cfg["metrics"]["jsonl"] = "metrics.jsonl"
    if targets:
        cfg["teacher"]["targets"] = targets
    (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "asymkd.cli", "train", "--config", str(out / "run.yaml")]
    if nproc > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(bl.REPO_DIR)}
    t0 = time.perf_counter()
    with (out / "train.log").open("wb") as logf, pinned(cores):
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=bl.REPO_DIR)
    _, status, usage = os.wait4(proc.pid, 0)  # its usage includes the ranks it waited for (torchrun)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"asymkd train failed ({proc.returncode}):\n{tail(out / 'train.log')}")
    ahead = cfg["teacher"].get("prefetch", 4) if cfg.get("teacher", {}).get("targets") else 0
    sps = metrics_samples_per_s(out / "metrics.jsonl", warmup, ahead)
    return sps, usage.ru_utime + usage.ru_stime, time.perf_counter() - t0


def metrics_samples_per_s(path: Path, warmup: int, tail: int = 0) -> float:
    """Samples (every rank's, as the trainer gathers them) per second of the steps after `warmup`, without the
    last `tail` (a live teacher is done `prefetch` batches before the end: see runner.samples_per_s)."""
    steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = [r for r in steps if r.get("kind") == "train"]
    w, last = steady_window(len(steps), warmup, tail)
    return sum(len(r["sample_ids"]) for r in steps[w : last + 1]) / (
        steps[last]["time"] - steps[w - 1]["time"]
    )


def run_group(names: list[str], ctx: dict, args, rep: int) -> dict[str, tuple[float, float]]:
    """Run the configs in `names` (teacher_tp1 and split share one server, started once): per config
    (samples/s, CPU share = CPU seconds its processes got / (wall seconds × its devices))."""
    out: dict[str, tuple[float, float]] = {}
    work = ctx["work"] / f"r{rep}"
    for name in names:  # a fresh folder: the trainer refuses to write over another run's files
        shutil.rmtree(work / name, ignore_errors=True)
        (work / name).mkdir(parents=True)
    if names[0] in ("teacher_tp1", "split", "teacher_tp2"):
        tp = 2 if names[0] == "teacher_tp2" else 1
        with vllm_teacher(ctx, tp, CORE_T if tp == 1 else None, work / names[0] / "teacher.log") as teacher:
            for name in names:
                cpu0, t0 = tree_cpu_s(teacher.proc.pid), time.perf_counter()
                if name.startswith("teacher"):
                    res = teacher_alone(teacher.address, ctx["batches"], top_k=args.top_k,
                                        max_in_flight=args.prefetch, warmup_batches=args.warmup_steps)  # fmt: skip
                    sps, cpu, devices = res["samples_per_s"], 0.0, tp
                else:
                    cfg = train_config(ctx, args, kd=True)
                    sps, cpu, _ = run_train(cfg, work / name, nproc=1, cores=CORE_S, targets=[teacher.address],
                                            warmup=args.warmup_steps)  # fmt: skip
                    devices = 2
                cpu += tree_cpu_s(teacher.proc.pid) - cpu0
                out[name] = (sps, cpu / ((time.perf_counter() - t0) * devices))
        return out
    for name in names:
        kd, nproc = name == "symmetric", 1 if name == "student_1" else 2
        cfg = train_config(ctx, args, kd=kd, in_process=kd)
        cores = CORE_S if nproc == 1 else None
        sps, cpu, wall = run_train(
            cfg, work / name, nproc=nproc, cores=cores, targets=[], warmup=args.warmup_steps
        )
        out[name] = (sps, cpu / (wall * nproc))
    return out


def groups(rep: int) -> list[list[str]]:
    """One repeat's runs; odd repeats in reverse (teacher_tp1 and split share a server either way)."""
    order = [["teacher_tp1", "split"], ["symmetric"], ["student_1"], ["student_2"], ["teacher_tp2"]]
    return order if rep % 2 == 0 else [g[::-1] for g in order[::-1]]


# ------------------------------------------------------------------------------------------ predictions
def plan_config(ctx: dict, args, **kw) -> PlanConfig:
    """This machine as the planner sees it: one node of 2 "GPUs" (cores) with the measured rates; requests
    are the pair's micro-batches; links as measured (no further efficiency factor)."""
    pair = ctx["pair"]
    return PlanConfig(
        teacher=str(ctx["teacher"]), student=str(ctx["student"]), nodes=1, gpus_per_node=2, dtype="float32",
        seq_len=pair.seq_len, micro_batch=pair.batch_size, global_batch=2 * pair.batch_size, top_k=args.top_k,
        prefetch=args.prefetch, network_efficiency=1.0, reserve_gb=0.5, grpc_gbps=0.5, **kw,
    )  # fmt: skip


def predict(ctx: dict, args, spec, *, mfu: float, teacher_mfu: float) -> dict[str, float]:
    """Samples/s of every configuration from the cost model (asymkd/planner/cost.py)."""
    cl, wl = build_inputs(plan_config(ctx, args), spec)
    peak = spec.peak_tflops * 1e12  # fitted efficiencies may pass 1: the probe itself ran on a loaded core
    cl = dataclasses.replace(cl, flops=peak * mfu, teacher_flops=peak * teacher_mfu)
    t, s = resolve_model(str(ctx["teacher"])), resolve_model(str(ctx["student"]))
    one = dataclasses.replace(wl, global_batch=wl.micro_batch)  # a step of one rank
    tp1, tp2, s1 = TeacherLayout(1, 1, 1), TeacherLayout(1, 2, 1), StudentLayout(1, 1)
    out = {
        "teacher_tp1": teacher_cost(t, tp1, cl, one, student_ranks=1).samples_per_s,
        "teacher_tp2": teacher_cost(t, tp2, cl, one, student_ranks=1).samples_per_s,
        "student_1": student_cost(s, s1, cl, one, teacher=t).samples_per_s,
        "student_2": student_cost(s, StudentLayout(2, 1), cl, wl, teacher=t).samples_per_s,
        "symmetric": _symmetric_one(t, s, StudentLayout(2, 1), False, False, cl, wl).samples_per_s,
    }
    out["split"] = min(out["teacher_tp1"], out["student_1"], transport_samples_per_s(t, tp1, s1, cl, one))
    return out


def fit(target: float, f, lo: float = 1e-3, hi: float = 4.0) -> float:
    """The efficiency x with f(x) = target (f increasing), by bisection."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def predictions(ctx: dict, args, spec, measured: dict[str, dict]) -> dict:
    """Fit mfu on student_1 and teacher_mfu on teacher_tp1 (medians), predict all six."""
    med = {k: v["median"] for k, v in measured.items()}
    mfu = fit(med["student_1"], lambda x: predict(ctx, args, spec, mfu=x, teacher_mfu=1.0)["student_1"])
    t_mfu = fit(med["teacher_tp1"], lambda x: predict(ctx, args, spec, mfu=1.0, teacher_mfu=x)["teacher_tp1"])
    pred = predict(ctx, args, spec, mfu=mfu, teacher_mfu=t_mfu)
    rows = []
    for name in ORDER:
        err = pred[name] / med[name] - 1
        role = f"fit ({FIT[name]})" if name in FIT else "predicted"
        rows.append({"config": name, "role": role, "predicted": pred[name], "measured": measured[name],
                     "error": err, "within_25pct": abs(err) <= 0.25})  # fmt: skip
    return {"mfu": mfu, "teacher_mfu": t_mfu, "rows": rows}


def planner_cli(ctx: dict, args, mfu: float, teacher_mfu: float) -> dict:
    """`asymkd plan --calibrate --json` for this machine with the fitted efficiencies (capped at 1: the key's
    range) — what the planner picks here."""
    cfg = plan_config(ctx, args, mfu=min(mfu, 1.0), teacher_mfu=min(teacher_mfu, 1.0))
    keys = ("teacher", "student", "nodes", "gpus_per_node", "dtype", "seq_len", "micro_batch", "global_batch",
            "top_k", "prefetch", "network_efficiency", "reserve_gb", "grpc_gbps", "mfu", "teacher_mfu")  # fmt: skip
    argv = [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(cfg, k)))]
    cmd = [sys.executable, "-m", "asymkd.cli", "plan", *argv, "--calibrate", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=bl.REPO_DIR, check=True)
    data = json.loads(done.stdout)
    keep = (
        "best",
        "runner_up",
        "symmetric_samples_per_s",
        "gain_over_symmetric",
        "inflection",
        "calibration",
    )
    return {"command": "asymkd " + " ".join(cmd[3:]), **{k: data[k] for k in keep}}


# ----------------------------------------------------------------------------------------------- output
def as_table(result: dict) -> str:
    head = (
        f"{'config':<13}{'role':<20}{'predicted':>10}{'measured (min-max)':>24}{'error':>9}{'CPU share':>11}"
    )
    lines = [head, "-" * len(head)]
    shares = result.get("cpu_share") or {}
    for r in result["predictions"]["rows"]:
        share = shares.get(r["config"], {}).get("median")
        lines.append(
            f"{r['config']:<13}{r['role']:<20}{r['predicted']:>10.3f}{bl.fmt_summary(r['measured'], 3):>24}"
            f"{100 * r['error']:>+8.1f}%{'' if share is None else f'{share:>11.2f}'}"
        )
    p = result["predictions"]
    lines.append(
        f"fitted: mfu {p['mfu']:.3f}, teacher_mfu {p['teacher_mfu']:.3f} of the measured matmul rate"
    )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["predictions"]["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = range(len(rows))
    meas = [r["measured"]["median"] for r in rows]
    errs = [[m - r["measured"]["min"] for m, r in zip(meas, rows, strict=True)],
            [r["measured"]["max"] - m for m, r in zip(meas, rows, strict=True)]]  # fmt: skip
    ax.bar([x - 0.2 for x in xs], [r["predicted"] for r in rows], 0.4, label="predicted (cost model)")
    ax.bar([x + 0.2 for x in xs], meas, 0.4, yerr=errs, capsize=3, label="measured (median, min-max)")
    for x, r in zip(xs, rows, strict=True):
        ax.text(x, max(r["predicted"], r["measured"]["max"]) * 1.02, f"{100 * r['error']:+.0f}%", ha="center")
    ax.set_xticks(list(xs), [f"{r['config']}\n{r['role'].split(' ')[0]}" for r in rows])
    ax.set_ylabel("samples/s")
    m = result["machine"]
    loads = [r["load_average_1m"] for r in result["runs"]]
    ax.set_title(f"asymkd plan: predicted vs measured, {m['cpu_affinity']} cores (1 core = 1 device); 1-min load "
                 f"{m['load_average_1m_at_start']:.1f} at start, {min(loads):.1f}-{max(loads):.1f} after runs",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)
    bl.save_figure(fig, path)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny pair, batch 2 × 128, 5 steps, 1 repeat"
    )
    p.add_argument("--repeats", type=int, default=2, help="repeats of the whole sequence (odd ones reversed)")
    p.add_argument(
        "--steps", type=int, default=None, help="steps (and teacher batches) per run (16; quick 5)"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="first steps left out (default 3; quick 2)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=4, help="teacher.prefetch and score_stream's in flight")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate-s", type=float, default=8.0, help="time budget of the calibration")
    p.add_argument("--max-load", type=float, default=1.5, help="warn when the 1-min load average is above")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/planner.json)")
    p.add_argument(
        "--replot", action="store_true", help="no runs: predictions + plot again from --out's runs"
    )
    args = p.parse_args(argv)
    args.pair = "quick" if args.quick else "cpu"
    args.steps = args.steps or (5 if args.quick else 16)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (2 if args.quick else 3)
    if args.quick and args.repeats == p.get_default("repeats"):
        args.repeats = 1
    if args.out is None:  # a smoke run never overwrites the published results
        args.out = (bl.cache_root() if args.quick else bl.RESULTS_DIR) / (
            "planner_quick.json" if args.quick else "planner.json"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench/planner.py needs 2 cores (the two devices of the plans)")
    pair = PAIRS[args.pair]
    teacher, student = build_pair(pair)
    ctx = {"pair": pair, "teacher": teacher, "student": student,
           "work": bl.cache_root() / "runs" / f"planner-{pair.name}",
           "batches": training_batches(student, pair, args.steps, args.seed)}  # fmt: skip
    if args.replot:
        old = json.loads((ctx["work"] / "runs.json").read_text())
        spec, calibration, runs = GpuSpec(**old["calibrated_device"]), old["calibration"], old["runs"]
        load0, wall = old["machine"]["load_average_1m_at_start"], old["bench_wall_s"]
    else:
        spec, calibration, runs, wall = measure_all(ctx, args, load0)
    result = results(args, argv, ctx, spec, calibration, runs, load0, wall)
    result["replotted"] = args.replot  # runs, calibration and loads are the measured ones either way
    if args.replot:
        result["machine"].pop("load_average_1_5_15")  # that is now, not when the runs ran
    bl.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s\n%s", args.out, args.out.with_suffix(".png"), as_table(result))
    return 0


def measure_all(ctx: dict, args, load0: float) -> tuple:
    """Calibrate, then every repeat of every configuration; the raw runs are saved after each repeat."""
    spec, calibration = calibrate(args.calibrate_s)
    log.info("calibrated: %.1f GFLOP/s per core, gloo %.2f GB/s, %.0f µs", spec.peak_tflops * 1e3,
             spec.intra_gbps, spec.intra_latency_us)  # fmt: skip
    runs: list[dict] = []
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for group in groups(rep):
            started = time.perf_counter()
            for name, (sps, share) in run_group(group, ctx, args, rep).items():
                load = round(bl.load_average_1m(), 2)
                runs.append({"config": name, "repeat": rep, "samples_per_s": sps, "cpu_share": share,
                             "load_average_1m": load})  # fmt: skip
                log.info(
                    "r%d %-12s %7.3f samples/s  (CPU share %.2f, load %.2f)", rep, name, sps, share, load
                )
            log.info("   %s took %.0f s", "+".join(group), time.perf_counter() - started)
        partial = {"calibrated_device": dataclasses.asdict(spec), "calibration": calibration, "runs": runs,
                   "machine": {"load_average_1m_at_start": round(load0, 2)},
                   "bench_wall_s": time.perf_counter() - t0}  # fmt: skip
        bl.write_json(ctx["work"] / "runs.json", partial)  # what --replot reads
    return spec, calibration, runs, time.perf_counter() - t0


def results(args, argv, ctx, spec, calibration, runs, load0: float, wall_s: float) -> dict:
    measured = {n: bl.summarize([r["samples_per_s"] for r in runs if r["config"] == n]) for n in ORDER}
    preds = predictions(ctx, args, spec, measured)
    # CPU seconds a run's processes got / (wall × its devices), start-up and idle waits included: low when
    # other jobs took the cores, but also when a side waits (the split's teacher, faster than its student).
    shares = {
        n: bl.summarize([r["cpu_share"] for r in runs if r["config"] == n and "cpu_share" in r])
        for n in ORDER
    }
    machine = bl.machine_info({"vllm": bl._version("vllm")})
    machine |= {
        "load_average_1m_at_start": round(load0, 2),
        "load_average_1m_at_end": runs[-1]["load_average_1m"],  # right after the last run
    }
    pair = ctx["pair"]
    config = {
        "pair": pair.name, "teacher": vars(pair.teacher), "student": vars(pair.student),
        "teacher_params_m": bl.count_params(ctx["teacher"]) / 1e6,
        "student_params_m": bl.count_params(ctx["student"]) / 1e6, "micro_batch": pair.batch_size,
        "seq_len": pair.seq_len, "steps": args.steps, "warmup_steps_excluded": args.warmup_steps,
        "repeats": args.repeats, "top_k": args.top_k, "prefetch": args.prefetch, "dtype": "float32",
        "teacher_server": "vllm (pooling runner), enforce_eager, kv cache 512 MiB",
        "in_process_teacher": "hf backend", "order_of_repeat_0": groups(0),
    }  # fmt: skip
    return {
        "benchmark": "planner",
        "command": "python bench/planner.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "config": config,
        "calibration": calibration,
        "calibrated_device": dataclasses.asdict(spec),
        "predictions": preds,
        "all_within_25pct": all(r["within_25pct"] for r in preds["rows"]),
        "cpu_share": shares,
        "planner": planner_cli(ctx, args, preds["mfu"], preds["teacher_mfu"]),
        "runs": runs,
        "bench_wall_s": wall_s,
    }


if __name__ == "__main__":
    sys.exit(main())
