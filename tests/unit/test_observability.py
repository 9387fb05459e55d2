"""What a run writes while it trains: metrics.jsonl (every key of every step, docs/metrics.md) and TensorBoard
events with the same scalars; only rank 0 writes."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from student_trainer.config import MetricsSection
from student_trainer.observability import MetricsLogger, format_step_line

STEP = {"loss": 3.5, "kd": 3.25, "ce": 4.0, "lr": 1e-3, "gnorm": 0.5, "tok_per_s": 100.0, "step_time_s": 0.1,
        "mem_gb": 1.0, "sample_ids": [3, 1]}  # fmt: skip
EVAL = {"eval_loss": 6.5, "eval_ppl": 665.1, "eval_tokens": 400}


def write(tmp_path, rank: int) -> None:
    logger = MetricsLogger(MetricsSection(tensorboard=True), tmp_path, rank=rank, total_steps=2)
    logger.start(0)
    logger.log_step(1, STEP)
    logger.log_step(2, STEP | {"loss": 3.0})
    logger.log_eval(2, EVAL)
    logger.close()


def test_jsonl_and_tensorboard_get_every_scalar(tmp_path):
    write(tmp_path, rank=0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert records[1]["loss"] == 3.0 and records[0]["sample_ids"] == [3, 1] and records[2]["eval_loss"] == 6.5
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/kd", "train/ce", "eval/eval_loss"} <= set(scalars)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([3.5, 3.0])
    assert [(e.step, e.value) for e in events.Scalars("eval/eval_loss")] == [(2, pytest.approx(6.5))]


def test_other_ranks_write_nothing(tmp_path):
    write(tmp_path, rank=1)
    assert not any(tmp_path.iterdir())


def test_the_step_line_labels_losses_and_shows_on_policy_columns():
    line = format_step_line(3, 10, STEP | {"rollout_ms": 812.4, "staleness": 1}, eta_s=75.0, elapsed_s=12.0)
    assert line.startswith("+12s step 3/10 | train loss 3.5000 (kd 3.2500, ce 4.0000)")
    assert "rollout 812 ms, staleness 1" in line and line.endswith("eta 1m15s")
    assert "rollout" not in format_step_line(3, 10, STEP, eta_s=75.0)
