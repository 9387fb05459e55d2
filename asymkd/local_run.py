"""`asymkd run`: the embedded default. A local teacher process + the student on one machine, then a report.

    asymkd run --config examples/demo.yaml                 # what `make demo` runs
    asymkd run --config examples/demo.yaml --train.run.steps 50 --nproc-per-node 2
    asymkd run --help                                      # every key (serve.*, train.*, the run's own)

The YAML has two sections, each the config of one command, plus a few keys of the run itself:

    serve:   {model: default, backend: hf, max_top_k: 64}      # `asymkd serve` keys; host/port are chosen here
    train:   {model: {tokenizer: teacher, ...}, data: ..., distill: ..., run: {steps: 300, out_dir: runs/demo}}
    regime: cache              # live | cache (below)
    nproc_per_node: 1          # student ranks: 1 = in this process, N = torchrun --standalone (gloo on CPU)
    compare_ce_only: true      # also train a CE-only student on the same data and compare

Two regimes, each compared the way it is fair:
- `live`: the teacher serves while the distilled student trains (train.teacher.targets = the local teacher),
  and the CE-only student then trains the same steps, rows and seed: a comparison at **equal steps**.
- `cache`: the data-limited regime, where distillation pays. The teacher scores the training rows once into an
  offline cache (`<out_dir>/cache`) and stops; the distilled student trains from the cache, for as many epochs
  as run.steps takes; the CE-only student then trains for **the same wall-clock**: the teacher's whole time
  (start, cache write, stop) plus the distilled student's training loop (`run.max_seconds`). All of the
  teacher's time is charged to distillation.

Each student trains in `<out_dir>/kd` or `<out_dir>/ce_only` (the run owns them: a second run replaces them),
with held-out evaluations every run.eval_every steps. The teacher's own held-out CE is reported as the bound
the student moves toward. Prints a table (held-out CE, steps, wall seconds, samples/s, teacher seconds) and
the comparison, and writes `<out_dir>/comparison.json` and `<out_dir>/comparison.png` (held-out CE against
wall-clock for both students; needs matplotlib). `model.tokenizer: teacher` means the teacher's own tokenizer
folder. With `teacher_threads` and `student_threads` both set, a process that runs alone gets both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asymkd.config import dump_config
from student_trainer.config import TrainConfig, client_options
from teacher_server.config import ServeConfig

log = logging.getLogger("asymkd.student.run")
TEACHER_TOKENIZER = "teacher"  # train.model.tokenizer / path value: use the teacher's folder


@dataclass
class RunConfig:
    """Embedded default: a local teacher server + the student on one machine, then a comparison table."""

    train: TrainConfig
    """`asymkd train` keys; the teacher source is filled in by the run"""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`asymkd serve` keys of the local teacher (host/port are chosen by the run)"""
    regime: Literal["live", "cache"] = "live"
    """live: the teacher serves while the student trains, compared at equal steps; cache: the teacher scores
    the training rows once into an offline cache, compared at equal wall-clock with its time charged to KD"""
    nproc_per_node: int = 1
    """student ranks; > 1 runs the student under torchrun --standalone"""
    compare_ce_only: bool = False
    """also train the CE-only baseline (same data and seed; equal steps or equal wall-clock, by regime)"""
    teacher_reference: bool = True
    """report the teacher's own held-out CE (same rows as the student's eval)"""
    teacher_threads: int = 0
    """OMP threads of the teacher process; 0 = the library default"""
    student_threads: int = 0
    """torch threads per student rank; 0 = the library default"""
    teacher_start_timeout_s: float = 600.0
    """how long the teacher may take to load and say SERVING"""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.teacher_threads < 0 or self.student_threads < 0:
            raise ValueError(
                f"teacher_threads={self.teacher_threads} / student_threads={self.student_threads} must be >= 0"
            )

    @property
    def all_threads(self) -> int:
        """Threads for a process that runs alone (0 = the library default)."""
        both = self.teacher_threads and self.student_threads
        return self.teacher_threads + self.student_threads if both else 0


def teacher_model_dir(serve: ServeConfig) -> Path:
    """The teacher's HF folder ("default" = the embedded SmolLM2-135M-Instruct, converted once)."""
    if serve.model == "default":
        from teacher_server.models import default_teacher_dir

        return default_teacher_dir()
    return Path(serve.model).expanduser()


def with_teacher_tokenizer(train: TrainConfig, teacher_dir: Path) -> TrainConfig:
    """Replace the value `teacher` in model.tokenizer / model.path by the teacher's folder."""
    model = train.model
    changes = {k: str(teacher_dir) for k in ("tokenizer", "path") if getattr(model, k) == TEACHER_TOKENIZER}
    return dataclasses.replace(train, model=dataclasses.replace(model, **changes)) if changes else train


def variant(
    train: TrainConfig, out_dir: Path, teacher: dict, *, export: bool = True, **run: Any
) -> TrainConfig:
    """One student of the run in its own folder under out_dir, with the teacher source `teacher` (targets /
    cache keys; none = CE only); the run owns those folders, so a second `asymkd run` replaces them."""
    source = {"targets": [], "cache": "", "in_process": None} | teacher
    return dataclasses.replace(
        train,
        teacher=dataclasses.replace(train.teacher, **source),
        run=dataclasses.replace(train.run, out_dir=str(out_dir), overwrite=True, **run),
        checkpoint=dataclasses.replace(train.checkpoint, export=export and train.checkpoint.export),
    )


# ---------------------------------------------------------------------------------------------- students
def train_student(train: TrainConfig, nproc: int, threads: int) -> dict[str, Any]:
    """Train one student (in this process, or under torchrun): its summary (summary.json), the process's wall
    seconds, and its held-out curve [(training-loop seconds, held-out CE), ...] from metrics.jsonl."""
    t0 = time.perf_counter()
    if nproc == 1:
        summary = _train_in_process(train, threads)
    else:
        summary = _train_torchrun(train, nproc, threads)
    records = [
        json.loads(x) for x in (Path(train.run.out_dir) / train.metrics.jsonl).read_text().splitlines()
    ]
    curve = [(r["elapsed_s"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    return summary | {"wall_s": time.perf_counter() - t0, "curve": curve}


def _train_in_process(train: TrainConfig, threads: int) -> dict[str, Any]:
    import torch

    from student_trainer.parallel import destroy_distributed
    from student_trainer.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    try:
        trainer = Trainer(train)
        try:
            return trainer.train()
        finally:
            trainer.close()
    finally:
        destroy_distributed()  # the next student builds its own 1-rank group


def _train_torchrun(train: TrainConfig, nproc: int, threads: int) -> dict[str, Any]:
    out = Path(train.run.out_dir)
    config = out.parent / f"{out.name}.yaml"
    dump_config(train, config)
    cmd = [sys.executable, "-m", "asymkd.torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "asymkd.cli", "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    log.info("student: %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the student run failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------------------------- teacher
def start_teacher(cfg: RunConfig, out: Path, threads: int):
    from teacher_server.launch import LocalTeacher

    serve_yaml = out / "serve.yaml"
    dump_config(cfg.serve, serve_yaml)
    return LocalTeacher(
        ["--config", str(serve_yaml)],
        host=cfg.serve.host,
        log_path=out / "teacher.log",
        env={"OMP_NUM_THREADS": str(threads)} if threads else None,
        start_timeout_s=cfg.teacher_start_timeout_s,
    )


def write_teacher_cache(train: TrainConfig, address: str, folder: Path) -> dict[str, Any]:
    """Every training row scored once by the teacher at `address` into the offline cache in `folder`."""
    from student_trainer.cache import write_cache
    from student_trainer.config import CacheWriteConfig

    sections = {f.name: getattr(train, f.name) for f in dataclasses.fields(TrainConfig)}
    sections["teacher"] = dataclasses.replace(train.teacher, targets=[address], cache="", in_process=None)
    return write_cache(CacheWriteConfig(**sections, out=str(folder)))


def teacher_heldout_ce(address: str, train: TrainConfig, nproc: int) -> float | None:
    """The teacher's CE on the rows the student's evaluation reads (eval_batches per rank, every rank)."""
    from transformers import AutoTokenizer

    from student_trainer.data import PackedDataset, load_packs, tokenizer_id
    from student_trainer.sources.common import score_from_rows
    from teacher_server.client import TeacherClient

    tok_dir = Path(train.model.tokenizer or train.model.path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    packs = load_packs(train.data, tok, tokenizer_id(tok_dir))
    if "eval" not in packs:
        return None
    total, count = 0.0, 0
    with TeacherClient([address], **client_options(train.teacher)) as client:
        for rank in range(nproc):
            held = PackedDataset(
                packs["eval"], micro_batch_size=train.optim.micro_batch_size, rank=rank,
                world_size=nproc, shuffle=False,
            )  # fmt: skip
            for i in range(train.run.eval_batches):
                batch = held.batch(i)
                mask = batch["loss_mask"]
                starts, _ = score_from_rows(mask)
                scores = client.score(
                    list(batch["input_ids"]), score_from=starts.tolist(), signal="target_only"
                )
                for row, (s, start) in enumerate(zip(scores, starts.tolist(), strict=True)):
                    keep = mask[row, start:]
                    total -= float(s.target_logprob[keep].double().sum())
                    count += int(keep.sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig) -> dict[str, Any]:
    """Both students of the regime, the teacher's reference, the report (module docstring)."""
    from asymkd.run_report import equal_budget_line, format_table, plot_curves

    out = Path(cfg.train.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "run.yaml")
    train = with_teacher_tokenizer(cfg.train, teacher_model_dir(cfg.serve))
    live = cfg.regime == "live"
    t0 = time.perf_counter()
    log.info("starting the teacher (%s, %s backend); log: %s", cfg.serve.model, cfg.serve.backend, out)
    teacher = start_teacher(cfg, out, cfg.teacher_threads if live else cfg.all_threads).start()
    try:
        log.info("teacher SERVING at %s", teacher.address)
        if live:  # the teacher serves while the student trains
            kd = train_student(variant(train, out / "kd", {"targets": [teacher.address]}), cfg.nproc_per_node,
                               cfg.student_threads)  # fmt: skip
        else:  # the teacher's work done once: every training row scored into the cache
            t_cache = time.perf_counter()
            cache = write_teacher_cache(train, teacher.address, out / "cache")
            log.info(
                "teacher cache: %d rows in %.1f s -> %s",
                cache["rows"],
                time.perf_counter() - t_cache,
                out / "cache",
            )
        teacher_ce = None
        if cfg.teacher_reference and train.has_eval:  # the bound the students move toward (not charged)
            t_ref = time.perf_counter()
            teacher_ce = teacher_heldout_ce(teacher.address, train, cfg.nproc_per_node)
            t0 += time.perf_counter() - t_ref
    finally:
        teacher.stop()
    teacher_s = time.perf_counter() - t0  # start, (cache write,) stop: all charged to the distilled student
    rows = []
    if live:
        teacher_s -= kd["wall_s"]  # the teacher's time that did not overlap the training
        rows.append(
            {"name": "distilled (KD)", **kd, "teacher_s": teacher_s, "clock_s": teacher_s + kd["train_s"]}
        )
    else:
        kd = train_student(variant(train, out / "kd", {"cache": str(out / "cache")}), cfg.nproc_per_node,
                           cfg.all_threads or cfg.student_threads)  # fmt: skip
        rows.append(
            {"name": "distilled (KD)", **kd, "teacher_s": teacher_s, "clock_s": teacher_s + kd["train_s"]}
        )
    if cfg.compare_ce_only:  # the teacher has stopped: its cores go to the baseline too
        budget = {} if live else {"max_seconds": rows[0]["clock_s"], "steps": 10**6}  # the clock decides
        ce = train_student(variant(train, out / "ce_only", {}, export=False, **budget), cfg.nproc_per_node,
                           cfg.all_threads or cfg.student_threads)  # fmt: skip
        rows.append({"name": "CE only", **ce, "teacher_s": 0.0, "clock_s": ce["train_s"]})
    report = {
        "regime": cfg.regime,
        "runs": rows,
        "teacher_heldout_ce": teacher_ce,
        "export": rows[0].get("export"),
    }
    if len(rows) == 2:
        epochs = None if live else rows[0]["samples"] / max(cache["rows"], 1)
        report["comparison"] = equal_budget_line(rows, cfg.regime, epochs)
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    plot = plot_curves(rows, out / "comparison.png", title=f"asymkd run ({cfg.regime} regime)")
    print(format_table(rows, teacher_ce), flush=True)
    if "comparison" in report:
        print(report["comparison"]["text"], flush=True)
    print(f"report: {out / 'comparison.json'}" + (f", plot: {plot}" if plot else ""), flush=True)
    if report["export"]:
        print(f"distilled student exported to {report['export']}", flush=True)
    return report
