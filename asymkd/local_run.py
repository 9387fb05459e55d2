"""`asymkd run`: the embedded default. A local teacher process + the student on one machine, then a report.

    asymkd run --config examples/demo.yaml                 # what `make demo` runs
    asymkd run --config examples/demo.yaml --train.run.steps 50 --nproc-per-node 2
    asymkd run --help                                      # every key (serve.*, train.*, the run's own)

The YAML has two sections, each the config of one command, plus a few keys of the run itself:

    serve:   {model: default, backend: hf, max_top_k: 64}      # `asymkd serve` keys; host/port are chosen here
    train:   {model: {tokenizer: teacher, ...}, data: ..., distill: ..., run: {steps: 300, out_dir: runs/demo}}
    nproc_per_node: 1          # student ranks: 1 = in this process, N = torchrun --standalone (gloo on CPU)
    compare_ce_only: true      # also train a CE-only student (same steps, data, seed) and compare

Order: start the teacher (`LocalTeacher`: a child process on a free loopback port, SERVING before we go on),
fill `train.teacher.targets` with its address, train the distilled student in `<out_dir>/kd` (held-out CE,
export to `<out_dir>/kd/final`), score the held-out rows with the teacher itself (its CE: the bound the
student moves toward), stop the teacher, then (compare_ce_only) train the CE-only student in
`<out_dir>/ce_only` (with `teacher_threads + student_threads` threads when both are set: the same cores the
distilled run used). Prints a table (held-out CE, steps, wall-clock, samples/s, teacher wait) and writes it
to `<out_dir>/comparison.json`. `model.tokenizer: teacher` means the teacher's own tokenizer folder.
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
from typing import Any

from asymkd.config import dump_config
from student_trainer.config import TrainConfig, client_options
from teacher_server.config import ServeConfig

log = logging.getLogger("asymkd.student.run")
TEACHER_TOKENIZER = "teacher"  # train.model.tokenizer / path value: use the teacher's folder


@dataclass
class RunConfig:
    """Embedded default: a local teacher server + the student on one machine, then a comparison table."""

    train: TrainConfig
    """`asymkd train` keys; teacher.targets is filled with the local teacher's address"""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """`asymkd serve` keys of the local teacher (host/port are chosen by the run)"""
    nproc_per_node: int = 1
    """student ranks; > 1 runs the student under torchrun --standalone"""
    compare_ce_only: bool = False
    """also train the CE-only baseline (same steps, data, seed)"""
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


def variant(train: TrainConfig, out_dir: Path, targets: list[str], *, export: bool = True) -> TrainConfig:
    """One student of the run in its own folder under out_dir; the run owns those folders, so a second
    `asymkd run` replaces them (run.overwrite)."""
    return dataclasses.replace(
        train,
        teacher=dataclasses.replace(train.teacher, targets=targets),
        run=dataclasses.replace(train.run, out_dir=str(out_dir), overwrite=True),
        checkpoint=dataclasses.replace(train.checkpoint, export=export and train.checkpoint.export),
    )


# ---------------------------------------------------------------------------------------------- students
def train_student(cfg: RunConfig, train: TrainConfig) -> dict[str, Any]:
    """Train one student (in this process, or under torchrun); its summary + figures from metrics.jsonl."""
    out = Path(train.run.out_dir)
    t0 = time.perf_counter()
    if cfg.nproc_per_node == 1:
        summary = _train_in_process(train, cfg.student_threads)
    else:
        summary = _train_torchrun(train, cfg.nproc_per_node, cfg.student_threads)
    return summary | {"wall_s": time.perf_counter() - t0} | run_figures(out / train.metrics.jsonl)


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
        destroy_distributed()  # the CE-only run builds its own 1-rank group


def _train_torchrun(train: TrainConfig, nproc: int, threads: int) -> dict[str, Any]:
    out = Path(train.run.out_dir)
    config = out / "train.yaml"
    dump_config(train, config)
    cmd = [sys.executable, "-m", "asymkd.torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "asymkd.cli", "train", "--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    log.info("student: %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the student run failed (exit {done.returncode}): {' '.join(cmd)}")
    return json.loads((out / "summary.json").read_text())


def run_figures(metrics_path: Path) -> dict[str, Any]:
    """Samples, training-loop time and teacher wait summed over the steps of a metrics.jsonl."""
    steps = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in steps if r.get("kind") == "train"]
    train_s = sum(r["step_time_s"] for r in steps)
    samples = sum(len(r["sample_ids"]) for r in steps)
    wait_s = sum(r.get("teacher_wait_ms", 0.0) for r in steps) / 1e3
    return {
        "steps": len(steps),
        "samples": samples,
        "train_s": train_s,
        "samples_per_s": samples / max(train_s, 1e-9),
        "teacher_wait_s": wait_s,
    }


# ----------------------------------------------------------------------------------------------- teacher
def start_teacher(cfg: RunConfig, out: Path):
    from teacher_server.launch import LocalTeacher

    serve_yaml = out / "serve.yaml"
    dump_config(cfg.serve, serve_yaml)
    env = {"OMP_NUM_THREADS": str(cfg.teacher_threads)} if cfg.teacher_threads else None
    return LocalTeacher(
        ["--config", str(serve_yaml)],
        host=cfg.serve.host,
        log_path=out / "teacher.log",
        env=env,
        start_timeout_s=cfg.teacher_start_timeout_s,
    )


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


# ------------------------------------------------------------------------------------------------ report
def format_table(rows: list[dict[str, Any]], teacher_ce: float | None) -> str:
    head = f"{'student':<16}{'held-out CE':>12}{'steps':>7}{'samples':>9}{'train s':>9}{'wall s':>8}"
    head += f"{'samples/s':>11}{'teacher wait s':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ce = r.get("eval_loss")
        lines.append(
            f"{r['name']:<16}{'-' if ce is None else f'{ce:.4f}':>12}{r['steps']:>7}{r['samples']:>9}"
            f"{r['train_s']:>9.1f}{r['wall_s']:>8.1f}{r['samples_per_s']:>11.2f}{r['teacher_wait_s']:>16.1f}"
        )
    if teacher_ce is not None:
        lines.append(f"{'teacher':<16}{teacher_ce:>12.4f}   (the teacher's own CE on the same held-out rows)")
    return "\n".join(lines)


def run(cfg: RunConfig) -> dict[str, Any]:
    out = Path(cfg.train.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "run.yaml")
    train = with_teacher_tokenizer(cfg.train, teacher_model_dir(cfg.serve))
    rows, teacher_ce = [], None
    log.info("starting the teacher (%s, %s backend); log: %s", cfg.serve.model, cfg.serve.backend, out)
    with start_teacher(cfg, out) as teacher:
        log.info("teacher SERVING at %s", teacher.address)
        kd = train_student(cfg, variant(train, out / "kd", [teacher.address]))
        rows.append({"name": "distilled (KD)", **kd})
        if cfg.teacher_reference and train.has_eval:
            teacher_ce = teacher_heldout_ce(teacher.address, train, cfg.nproc_per_node)
    if cfg.compare_ce_only:  # the teacher has stopped: its cores go to the baseline (same cores in all)
        cores = (
            cfg.student_threads + cfg.teacher_threads if cfg.student_threads and cfg.teacher_threads else 0
        )
        ce_cfg = dataclasses.replace(cfg, student_threads=cores or cfg.student_threads)
        ce = train_student(ce_cfg, variant(train, out / "ce_only", [], export=False))
        rows.append({"name": "CE only", **ce})
    report = {"runs": rows, "teacher_heldout_ce": teacher_ce, "export": str(out / "kd" / "final")}
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    print(format_table(rows, teacher_ce), flush=True)
    if train.checkpoint.export:
        print(f"distilled student exported to {out / 'kd' / 'final'}", flush=True)
    return report
