"""Real `torchrun --nproc_per_node=2` (gloo, FSDP2) student runs, CE-only, on a small generated corpus.

One 6-step run (checkpoints at steps 3 and 6, activation checkpointing on) is shared by the tests: loss goes
down; sample ids are never repeated; a run resumed from step 3 reproduces steps 4-6 exactly; the same global
batch on one rank gives the same losses (token normalization across ranks); the export loads in transformers
with the checkpoint's weights. Helpers (`write_corpus`, `write_config`, `run_train`, `read_metrics`) are
config-driven so a KD run only adds `teacher.targets`.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from asymkd.config import load_config
from student_trainer.config import TrainConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 6


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "runs",
    "jumps",
    "over",
    "under",
    "quickly",
    "slowly",
    "big",
    "small",
    "red",
    "blue",
    "house",
    "tree",
    "river",
]  # a small, learnable word distribution


def write_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Paragraphs of a small, learnable word distribution (one document per paragraph)."""
    rng = random.Random(seed)
    docs = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(n_docs))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def write_config(path: Path, student_dir: Path, corpus: Path, out_dir: Path, **sections: dict) -> Path:
    cfg = {
        "model": {"path": str(student_dir)},
        "data": {"paths": [str(corpus)], "seq_len": 64, "eval_fraction": 0.1},
        "optim": {"lr": 1e-2, "micro_batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 2},
        "run": {"out_dir": str(out_dir), "steps": STEPS, "eval_every": 3, "eval_batches": 2},
        "checkpoint": {"every_steps": 3, "keep": 2},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(config: Path, *overrides: str, nproc: int = 2, cache: Path, timeout_s: float = 180):
    """`asymkd train` under torchrun (nproc > 1) or as one plain process; fails the test on a non-zero exit."""
    train = ["-m", "asymkd.cli", "train", "--config", str(config), *overrides]
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    env = {**os.environ, "ASYMKD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, *launcher, *train],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dir):
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root / "corpus.txt")
    return root, corpus, tiny_student_dir


@pytest.fixture(scope="module")
def run_a(setup):
    root, corpus, student = setup
    out = root / "a"
    config = write_config(root / "a.yaml", student, corpus, out, parallel={"activation_checkpointing": True})
    proc = run_train(config, cache=root / "cache")
    return out, config, proc


def test_two_rank_run_learns_and_logs_every_sample_once(run_a):
    out, _, proc = run_a
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in train]
    assert losses[-1] < losses[0] - 0.5, losses
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    ids = [i for r in train for i in r["sample_ids"]]
    assert all(len(r["sample_ids"]) == 2 * 4 * 2 for r in train)  # ranks × micro-batch × accumulation
    assert len(ids) == len(set(ids)), "a packed row was trained on twice within the epoch"
    assert re.search(r"\[student r0\] .*step 6/6 \| train loss", proc.stderr), proc.stderr
    assert "[student r1]" not in proc.stderr
    resolved = load_config(TrainConfig, out / "config.yaml")  # the resolved config round-trips
    assert resolved.parallel.activation_checkpointing and resolved.run.steps == STEPS
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]


def test_resume_reproduces_the_uninterrupted_run(run_a, setup):
    out_a, config, _ = run_a
    root = setup[0]
    out_b = root / "b"
    step3 = out_a / "checkpoints" / "step_0000003"
    run_train(
        config,
        "--run.out_dir",
        str(out_b),
        "--checkpoint.resume",
        str(step3),
        "--checkpoint.export",
        "false",
        cache=root / "cache",
    )
    a, _ = read_metrics(out_a)
    b, _ = read_metrics(out_b)
    assert [r["step"] for r in b] == [4, 5, 6]
    for ra, rb in zip(a[3:], b, strict=True):
        assert rb["sample_ids"] == ra["sample_ids"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        assert rb["gnorm"] == pytest.approx(ra["gnorm"], abs=1e-6)


def test_one_rank_with_the_same_global_batch_matches(run_a, setup):
    """Micro-batch i on 2 ranks × 4 rows = on 1 rank × 8 rows: normalization makes the steps identical."""
    out_a, config, _ = run_a
    root = setup[0]
    out_c = root / "c"
    overrides = ["--run.out_dir", str(out_c), "--optim.micro_batch_size", "8", "--checkpoint.export", "false"]
    run_train(
        config,
        *overrides,
        "--checkpoint.every_steps",
        "0",
        "--run.eval_every",
        "0",
        nproc=1,
        cache=root / "cache",
    )
    a, _ = read_metrics(out_a)
    c, _ = read_metrics(out_c)
    for ra, rc in zip(a, c, strict=True):
        assert sorted(rc["sample_ids"]) == sorted(ra["sample_ids"])
        assert rc["loss"] == pytest.approx(ra["loss"], abs=1e-5)
        assert rc["gnorm"] == pytest.approx(ra["gnorm"], rel=1e-4)


def test_export_loads_in_transformers_with_the_checkpoint_weights(run_a, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = run_a
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out / "final")
    dcp_to_torch_save(out / "checkpoints" / "step_0000006", tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    exported = model.state_dict()
    assert set(saved) == set(exported)
    for name, tensor in saved.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    ids = tok("the cat runs over the river", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
