"""Run the asymkd product the way a user does, for the benchmarks: a real teacher server (LocalTeacher, hf or
vllm backend) and `asymkd train` as a child process with a YAML config; read back its metrics.jsonl.

    placement = Placement.shared()                   # or Placement.split(): teacher on core 0, student on 1
    with start_teacher(model_dir, "hf", placement, log_path) as teacher:
        result = run_train(config_dict, out_dir, placement=placement, teacher=teacher)
    result.samples_per_s, result.trainer_peak_mb, result.teacher_peak_mb

Timing comes from the trainer's own per-step records (`time` after each optimizer step), so start-up
(imports, model build, data packing, the GetInfo handshake) is never counted; the first `warmup_steps`
steps are left out as well. Peak memory: the trainer's from wait4() (its ru_maxrss), the teacher's as the sum
of VmHWM over its process tree (vLLM runs engine processes), sampled while the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.benchlib import REPO_DIR, ProcessTreePeak, load_average_1m
from student_trainer.teacher_config import TeacherSection


# ---------------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class Placement:
    """Which cores and how many torch threads the teacher and the student get (None/0 = all/default)."""

    name: str
    teacher_cores: frozenset[int] | None = None
    student_cores: frozenset[int] | None = None
    teacher_threads: int = 0
    student_threads: int = 0

    @staticmethod
    def shared() -> Placement:
        return Placement("shared")

    @staticmethod
    def split() -> Placement:
        """Teacher on the first half of our cores, student on the rest (each with that many threads)."""
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise RuntimeError("--split-cores needs at least 2 cores")
        half = len(cores) // 2
        t, s = frozenset(cores[:half]), frozenset(cores[half:])
        return Placement("split", t, s, len(t), len(s))

    def student_env(self) -> dict[str, str]:
        return {"OMP_NUM_THREADS": str(self.student_threads)} if self.student_threads else {}

    def student_preexec(self):
        cores = self.student_cores
        return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


@contextlib.contextmanager
def pinned(cores: frozenset[int] | None) -> Iterator[None]:
    """Run the block with this process pinned to `cores` (children started inside inherit it)."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ------------------------------------------------------------------------------------------------ teacher
def teacher_env(backend: str, placement: Placement) -> dict[str, str]:
    cores = sorted(placement.teacher_cores or os.sched_getaffinity(0))
    if backend == "vllm":
        # vLLM's CPU worker binds its OpenMP threads itself (../shared/RECIPES.md): give it exactly our cores.
        bind = f"{cores[0]}-{cores[-1]}" if len(cores) > 1 else str(cores[0])
        return {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_LOGGING_LEVEL": "WARNING"}
    return {"OMP_NUM_THREADS": str(placement.teacher_threads)} if placement.teacher_threads else {}


@contextlib.contextmanager
def start_teacher(
    model_dir: str | Path,
    backend: str,
    placement: Placement,
    log_path: Path,
    *,
    dtype: str = "float32",
    extra_args: list[str] | None = None,
    start_timeout_s: float = 600.0,
) -> Iterator:
    """A LocalTeacher serving `model_dir`, pinned per `placement`; yields it (with `.peak` sampling RSS)."""
    from teacher_server.launch import LocalTeacher

    args = ["--model", str(model_dir), "--backend", backend, "--dtype", dtype, *(extra_args or [])]
    teacher = LocalTeacher(
        args, log_path=log_path, env=teacher_env(backend, placement), start_timeout_s=start_timeout_s
    )
    with pinned(placement.teacher_cores):
        teacher.start()
    teacher.peak = ProcessTreePeak(teacher.proc.pid)
    try:
        yield teacher
    finally:
        teacher.peak.sample()
        teacher.stop()


# ------------------------------------------------------------------------------------------------ trainer
@dataclass
class TrainResult:
    """One `asymkd train` run, read from its metrics.jsonl."""

    returncode: int
    steps: int
    samples_per_s: float | None
    step_s_mean: float | None
    trainer_peak_mb: float
    teacher_peak_mb: float | None
    wall_s: float  # the whole child process, start-up included
    final: dict = field(default_factory=dict)  # loss / kd / ce of the last step
    teacher_wait_ms_mean: float | None = None
    train_records: list[dict] = field(default_factory=list)
    eval_records: list[dict] = field(default_factory=list)
    log_path: str = ""
    cache_write_s: float = 0.0  # seconds spent writing an offline teacher cache before this run (quality.py)

    def summary(self) -> dict:
        keep = ("returncode", "steps", "samples_per_s", "step_s_mean", "trainer_peak_mb", "teacher_peak_mb")
        out = {k: getattr(self, k) for k in keep}
        total = self.trainer_peak_mb + (self.teacher_peak_mb or 0.0)
        return out | {
            "total_peak_mb": total,
            "wall_s": self.wall_s,
            "final_loss": self.final.get("loss"),
            "final_kd": self.final.get("kd"),
            "final_ce": self.final.get("ce"),
            "teacher_wait_ms_mean": self.teacher_wait_ms_mean,
            "loss_curve": [
                r.get("kd") if r.get("kd") is not None else r.get("loss") for r in self.train_records
            ],
        }


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            rec.pop("sample_ids", None)
            if rec.get("kind") == "train":
                train.append(rec)
            elif rec.get("kind") == "eval":
                evals.append(rec)
    return train, evals


def steady_window(n: int, warmup: int, tail: int) -> tuple[int, int]:
    """Indices (first, last) of the timed steps among n records: after `warmup` (>= 1: the first step's end
    starts the clock), without the last `tail`; at least one step."""
    first = min(max(warmup, 1), n - 1)
    return first, max(n - 1 - tail, first)


def samples_per_s(
    records: list[dict], batch_size: int, warmup_steps: int, tail_steps: int = 0
) -> tuple[float | None, float | None]:
    """(samples/s, mean step time) over the steps after `warmup_steps`, from the per-step end times, leaving
    out the last `tail_steps`: a live teacher scores `prefetch` batches ahead, so the run's last steps train
    with the teacher already done and its cores free, faster than the steady state being measured."""
    if len(records) < 2:
        return None, None
    w, last = steady_window(len(records), warmup_steps, tail_steps)
    span = records[last]["time"] - records[w - 1]["time"]
    n = last - w + 1
    return n * batch_size / span, span / n


def run_train(
    config: dict,
    out_dir: Path,
    *,
    placement: Placement,
    teacher=None,
    warmup_steps: int = 3,
    timeout_s: float = 3600.0,
) -> TrainResult:
    """`asymkd train --config out_dir/run.yaml` as a child process; teacher targets are filled in."""
    config = json.loads(json.dumps(config))  # a private copy
    config.setdefault("run", {}).update(
        out_dir=str(out_dir), overwrite=True
    )  # every measurement starts fresh
    config.setdefault("metrics", {})["jsonl"] = "metrics.jsonl"
    log_path = out_dir / "train.log"
    cmd, env = _asymkd_child(["train"], config, out_dir / "run.yaml", placement, teacher)
    t0 = time.perf_counter()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_DIR,
            preexec_fn=placement.student_preexec(),
        )
        rc, trainer_peak = _wait_sampling(proc, teacher, timeout_s)
    wall = time.perf_counter() - t0
    train, evals = read_metrics(out_dir / "metrics.jsonl")
    batch = config.get("optim", {}).get("micro_batch_size", 8) * config.get("optim", {}).get(
        "grad_accum_steps", 1
    )
    live = teacher is not None and "teacher" in config and not config["teacher"].get("cache")
    tail = config["teacher"].get("prefetch", TeacherSection.prefetch) if live else 0
    sps, step_s = samples_per_s(train, batch, warmup_steps, tail)
    waits = [
        r["teacher_wait_ms"]
        for r in train[warmup_steps : len(train) - tail]
        if r.get("teacher_wait_ms") is not None
    ]
    return TrainResult(
        returncode=rc,
        steps=len(train),
        samples_per_s=sps,
        step_s_mean=step_s,
        trainer_peak_mb=trainer_peak,
        teacher_peak_mb=teacher.peak.read_mb() if teacher is not None else None,
        wall_s=wall,
        final={k: train[-1].get(k) for k in ("loss", "kd", "ce")} if train else {},
        teacher_wait_ms_mean=sum(waits) / len(waits) if waits else None,
        train_records=train,
        eval_records=evals,
        log_path=str(log_path),
    )


def _asymkd_child(
    command: list[str], config: dict, cfg_path: Path, placement: Placement, teacher
) -> tuple[list[str], dict[str, str]]:
    """Write `config` (teacher targets filled in) to `cfg_path`; the `asymkd <command>` line and its env."""
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    if teacher is not None:
        config = {**config, "teacher": {**config.get("teacher", {}), "targets": [teacher.address]}}
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "asymkd.cli", *command, "--config", str(cfg_path)]
    return cmd, {**os.environ, **placement.student_env(), "PYTHONPATH": str(REPO_DIR)}


def measure(
    kind: str, config: dict | None, out: Path, *, teacher, placement: Placement, batches, args
) -> dict:
    """One timed measurement of the benchmarks' shared kinds: "teacher" = the teacher alone scoring `batches`
    (args.top_k, args.prefetch in flight), anything else = `asymkd train` with `config`. Its summary dict."""
    if kind == "teacher":
        res = teacher_alone(
            teacher.address,
            batches,
            top_k=args.top_k,
            max_in_flight=args.prefetch,
            warmup_batches=args.warmup_steps,
        )
        return res | {"teacher_peak_mb": teacher.peak.read_mb()}
    tr = run_train(config, out, placement=placement, teacher=teacher, warmup_steps=args.warmup_steps)
    if tr.returncode != 0 or tr.samples_per_s is None:
        raise RuntimeError(f"asymkd train failed ({tr.returncode}); log {tr.log_path}:\n{tail(tr.log_path)}")
    return tr.summary()


def record(spec: Any, repeat: int, res: dict, seconds: float, logger: logging.Logger) -> dict:
    """A run's JSON row (the spec's fields, the result, the load right after), logged in one line."""
    logger.info("r%d %-28s %6.2f samples/s  (%.0f s)", repeat, spec.name, res["samples_per_s"], seconds)
    load = round(load_average_1m(), 2)
    return {"name": spec.name, "repeat": repeat, **asdict(spec), **res, "load_average_1m": load}


def write_cache(config: dict, out_dir: Path, cache_dir: Path, *, placement: Placement, teacher) -> float:
    """`asymkd cache write` as a child process: the teacher scores every training row of `config` once into
    `cache_dir`. Returns its wall seconds (start-up included: what a user pays for the cache)."""
    cmd, env = _asymkd_child(["cache", "write"], config, out_dir / "cache.yaml", placement, teacher)
    cmd += ["--out", str(cache_dir)]
    t0 = time.perf_counter()
    with (out_dir / "cache.log").open("wb") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_DIR)
    if rc != 0:
        raise RuntimeError(f"asymkd cache write failed ({rc}):\n{tail(str(out_dir / 'cache.log'))}")
    return time.perf_counter() - t0


def _wait_sampling(proc: subprocess.Popen, teacher, timeout_s: float) -> tuple[int, float]:
    """Wait for the trainer (exit code, its peak RSS in MB) while sampling the teacher tree's peak RSS."""
    deadline = time.monotonic() + timeout_s
    last_sample = 0.0
    while True:
        # wait4, not proc.poll(): poll() would reap the child and lose its resource usage.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"asymkd train did not finish in {timeout_s:.0f} s")
        if teacher is not None and time.monotonic() - last_sample > 0.5:
            teacher.peak.sample()
            last_sample = time.monotonic()
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------- teacher alone
def teacher_alone(
    address: str,
    batches: list[dict],
    *,
    signal: str = "top_k",
    top_k: int = 64,
    max_in_flight: int = 4,
    warmup_batches: int = 3,
) -> dict:
    """Scoring throughput of a teacher server on the training batches (the requests the trainer's feed
    sends: same rows, same score_from), pipelined on ScoreStream like the feed. samples/s after warm-up."""
    from student_trainer.config import DistillSection
    from student_trainer.sources.live import build_query
    from teacher_server.client import TeacherClient

    distill = DistillSection(signal=signal, top_k=top_k if signal == "top_k" else DistillSection.top_k)
    queries = [build_query(b, distill, top_k) for b in batches]
    done: list[float] = []
    with TeacherClient([address], timeout_s=600) as client:
        t0 = time.perf_counter()
        for _ in client.score_stream(queries, max_in_flight=max_in_flight):
            done.append(time.perf_counter())
    w = min(max(warmup_batches, 1), len(done) - 1)
    span = done[-1] - done[w - 1]
    n_rows = sum(len(b["input_ids"]) for b in batches[w:])
    return {
        "samples_per_s": n_rows / span,
        "batch_s_mean": span / (len(done) - w),
        "batches": len(done),
        "warmup_batches": w,
        "wall_s": done[-1] - t0,
        "max_in_flight": max_in_flight,
        "signal": signal,
        "top_k": top_k,
    }


def tail(path: str | Path, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
