"""`asymkd run` end to end on tiny models: local teacher process + KD student + CE-only baseline + report, in
both regimes (live: equal steps; cache: the teacher's rows scored once, equal wall-clock with its time charged
to KD)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer


def write_corpus(path) -> None:
    """A small JSONL corpus: docstrings of two stdlib modules."""
    import argparse
    import inspect
    import logging

    docs = [inspect.getdoc(obj) for mod in (argparse, logging) for obj in vars(mod).values()]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d and len(d) > 80))


def run_config(tmp_path, tiny_teacher_dir, out, **extra) -> dict:
    write_corpus(tmp_path / "corpus.jsonl")
    return {
        "serve": {"model": str(tiny_teacher_dir), "backend": "hf", "max_top_k": 32},
        "train": {
            "model": {"tokenizer": "teacher", "hidden_size": 32, "num_layers": 1, "num_heads": 1},
            "data": {"paths": [str(tmp_path / "corpus.jsonl")], "seq_len": 32, "eval_fraction": 0.2},
            "optim": {"lr": 3e-3, "micro_batch_size": 4},
            "distill": {"top_k": 32},
            "run": {"steps": 6, "out_dir": str(out), "eval_batches": 2},
        },
        "compare_ce_only": True,
        "teacher_threads": 1,
        "student_threads": 1,
        **extra,
    }


def asymkd_run(tmp_path, config: dict) -> subprocess.CompletedProcess:
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "ASYMKD_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "asymkd.cli", "run", "--config", str(tmp_path / "run.yaml")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    assert "held-out CE" in table and "distilled (KD)" in table and "CE only" in table and "teacher" in table
    return done


@pytest.mark.slow
def test_asymkd_run_trains_compares_and_exports(tmp_path, tiny_teacher_dir):
    out = tmp_path / "demo"
    done = asymkd_run(tmp_path, run_config(tmp_path, tiny_teacher_dir, out))
    assert "live regime" in done.stdout and "at equal steps (6 vs 6)" in done.stdout
    report = json.loads((out / "comparison.json").read_text())
    kd, ce = report["runs"]
    for r in (kd, ce):
        assert r["step"] == 6 and r["samples"] == 24 and r["eval_loss"] > 0 and r["samples_per_s"] > 0
    assert kd["teacher_wait_s"] > 0 and "teacher_wait_s" not in ce
    assert report["teacher_heldout_ce"] > 0 and report["comparison"]["basis"] == "equal_steps"
    # same data, same order for both students (equal steps, equal rows)
    ids = [[json.loads(x)["sample_ids"] for x in (out / d / "metrics.jsonl").read_text().splitlines()
            if '"train"' in x] for d in ("kd", "ce_only")]  # fmt: skip
    assert ids[0] == ids[1]

    student = AutoModelForCausalLM.from_pretrained(out / "kd" / "final")
    tok = AutoTokenizer.from_pretrained(out / "kd" / "final")
    x = torch.tensor([tok("def main():").input_ids])
    assert student(input_ids=x).logits.shape[-1] == len(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    assert not (out / "ce_only" / "final").exists()  # only the distilled student is exported


@pytest.mark.slow
def test_the_cache_regime_charges_the_teachers_time_and_compares_at_equal_wall_clock(
    tmp_path, tiny_teacher_dir
):
    out = tmp_path / "demo"
    config = run_config(tmp_path, tiny_teacher_dir, out, regime="cache")
    config["train"]["optim"]["schedule"] = "constant"
    config["train"]["run"]["eval_every"] = 3
    done = asymkd_run(tmp_path, config)
    assert "data-limited regime" in done.stdout and "at equal wall-clock" in done.stdout
    report = json.loads((out / "comparison.json").read_text())
    kd, ce = report["runs"]
    assert (out / "cache" / "manifest.json").exists() and kd["step"] == 6
    assert kd["teacher_s"] > 0 and kd["clock_s"] == pytest.approx(kd["teacher_s"] + kd["train_s"])
    # the baseline trained for the distilled student's whole clock (its steps are whatever fit), not its steps
    assert ce["clock_s"] >= kd["clock_s"] and ce["step"] > kd["step"]
    assert report["comparison"]["basis"] == "equal_wall_clock" and len(kd["curve"]) >= 2
    assert (out / "comparison.png").stat().st_size > 0
