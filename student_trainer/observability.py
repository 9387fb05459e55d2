"""What a student run reports: one line per step on rank 0, a JSONL record per step, optional TensorBoard.

    setup_logging(rank)                       # "[student r0] ..." on rank 0 at INFO, other ranks WARNING+
    metrics = MetricsLogger(cfg.metrics, out_dir, rank=rank, total_steps=cfg.run.steps)
    metrics.log_step(12, {"loss": 3.21, "kd": 2.9, "ce": 3.5, "lr": 3e-4, ..., "sample_ids": [...]})

A progress line reads (the time of day, then the time since training started):
    [student r0] 14:03:12 +1m05s step 12/300 | train loss 3.2100 (kd 2.9000, ce 3.5000) | lr 3.0e-04 |
    gnorm 1.23 | tok/s 4,321 | teacher wait 3 ms, 4 ready | mem 1.2 GB | eta 2m10s
`train loss` is what is minimized, kd_weight · kd + ce_weight · ce on the training batch; an evaluation line
says `held-out CE` (the `eval_loss` of metrics.jsonl), and the run ends with a summary line. The JSONL file
(`metrics.jsonl` in the run folder; every key: docs/metrics.md) has every key of every step, including
`sample_ids` (the packed rows trained on, all ranks) so a test or a person can check no batch was lost or
doubled. TensorBoard (`metrics.tensorboard: true`, `pip install asymkd[tensorboard]`) gets the same scalars.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from student_trainer.config import MetricsSection

log = logging.getLogger("asymkd.student")


def setup_logging(rank: int, level: str = "INFO") -> None:
    """stdlib logging with a `[student rN]` prefix; only rank 0 logs below WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[student r{rank}] %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("asymkd")
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else "WARNING")
    root.propagate = False


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return peak_kb / 1e6


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_step_line(
    step: int, total: int | str, m: dict[str, Any], eta_s: float, elapsed_s: float = 0.0
) -> str:
    terms = ", ".join(f"{k} {m[k]:.4f}" for k in ("kd", "ce") if m.get(k) is not None)
    parts = [f"+{format_duration(elapsed_s)} step {step}/{total}", f"train loss {m['loss']:.4f} ({terms})"]
    parts += [f"lr {m['lr']:.1e}", f"gnorm {m['gnorm']:.2f}", f"tok/s {m['tok_per_s']:,.0f}"]
    if m.get("teacher_wait_ms") is not None:
        parts += [f"teacher wait {m['teacher_wait_ms']:.0f} ms, {m.get('prefetch', 0)} ready"]
    if m.get("rollout_ms") is not None:  # on-policy (onpolicy.py): the samples' cost and age
        stale = m.get("staleness")
        parts += [f"rollout {m['rollout_ms']:.0f} ms" + (f", staleness {stale}" if stale is not None else "")]
    parts += [f"mem {m['mem_gb']:.1f} GB", f"eta {format_duration(eta_s)}"]
    return " | ".join(parts)


def format_summary(summary: dict[str, Any]) -> str:
    """The run's last line: steps, time, throughput, final losses, where the results are."""
    parts = [f"done: {summary['step']} steps in {format_duration(summary.get('train_s', 0.0))}"]
    if summary.get("samples_per_s"):
        parts[0] += f" ({summary['samples_per_s']:.1f} samples/s)"
    if summary.get("loss") is not None:
        parts.append(f"final train loss {summary['loss']:.4f}")
    if summary.get("eval_loss") is not None:
        parts.append(f"held-out CE {summary['eval_loss']:.4f}")
    if summary.get("teacher_wait_s") is not None:
        parts.append(f"teacher wait {summary['teacher_wait_s']:.1f} s")
    return " | ".join(parts + [f"{k} {summary[k]}" for k in ("export", "checkpoint") if summary.get(k)])


class MetricsLogger:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(
        self,
        section: MetricsSection,
        out_dir: str | Path,
        *,
        rank: int,
        total_steps: int,
        max_seconds: float = 0.0,
    ) -> None:
        self.section, self.rank, self.total, self.max_seconds = section, rank, total_steps, max_seconds
        self._t0: float | None = None
        self._step0 = 0
        self._jsonl = None
        self._tb = None
        if rank != 0:
            return
        if section.jsonl:
            path = Path(out_dir) / section.jsonl
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = path.open("a", buffering=1)  # line-buffered: readable while the run goes on
        if section.tensorboard:
            self._tb = _tensorboard_writer(Path(out_dir) / "tensorboard")

    def start(self, step: int) -> None:
        """Mark where timing starts (after resume the ETA uses only the steps of this process)."""
        self._t0, self._step0 = time.perf_counter(), step

    def eta_s(self, step: int) -> float:
        if self._t0 is None or step <= self._step0:
            return 0.0
        per_step = (time.perf_counter() - self._t0) / (step - self._step0)
        eta = per_step * (self.total - step)
        return min(eta, max(self.max_seconds - self.elapsed_s, 0.0)) if self.max_seconds else eta

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self._write({"kind": "train", "step": step, "time": time.time(), **metrics})
        if step % self.section.log_every == 0 or step == self.total or metrics.get("out_of_time"):
            total = (
                f"{self.total} (at most {format_duration(self.max_seconds)})"
                if self.max_seconds
                else self.total
            )
            log.info(format_step_line(step, total, metrics, self.eta_s(step), self.elapsed_s))

    def log_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self._write({"kind": "eval", "step": step, "time": time.time(), **metrics})
        log.info(
            "+%s eval step %d | held-out CE %.4f (ppl %.1f, %s tokens)", format_duration(self.elapsed_s), step,
            metrics["eval_loss"], metrics["eval_ppl"], f"{metrics['eval_tokens']:,}",
        )  # fmt: skip

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.rank == 0:
            log.info(format_summary(summary))

    def log_event(self, kind: str, step: int, fields: dict[str, Any]) -> None:
        """A non-step record (e.g. "resume") in the JSONL file."""
        if self.rank == 0:
            self._write({"kind": kind, "step": step, "time": time.time(), **fields})

    def _write(self, record: dict[str, Any]) -> None:
        record["elapsed_s"] = self.elapsed_s  # training-loop time so far (this process)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            tag = record["kind"]
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("step", "time", "elapsed_s"):
                    self._tb.add_scalar(f"{tag}/{k}", v, record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the `tensorboard` package
        log.warning("metrics.tensorboard=true but the tensorboard package is not installed; skipping it")
        return None
    return SummaryWriter(str(path))
