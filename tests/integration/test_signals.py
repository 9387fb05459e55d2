"""Every teacher signal under real torchrun (2 ranks, gloo) against a real teacher server, and the tensor data
plane under it: FULL and HIDDEN over `teacher.data_plane: torch` train with the very per-step losses of the
same runs over gRPC, and HIDDEN with those of FULL; a student rank SIGKILLed mid-run leaves the teacher
serving another student that trains at the same time.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from teacher_server.launch import LocalTeacher

WORLD, MICRO = 2, 2


def write_corpus(path: Path) -> None:
    import argparse
    import logging

    docs = [inspect.getdoc(obj) for mod in (argparse, logging) for obj in vars(mod).values()]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d and len(d) > 80))


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    args = ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "64"]
    with LocalTeacher(args, log_path=log, env={"OMP_NUM_THREADS": "1"}) as t:
        yield t


def config(
    tmp: Path, tokenizer_dir, address: str, name: str, *, signal_name: str, plane: str, steps: int
) -> Path:
    cfg = {
        "model": {"tokenizer": str(tokenizer_dir), "hidden_size": 32, "num_layers": 2, "num_heads": 1},
        "data": {"paths": [str(tmp / "corpus.jsonl")], "seq_len": 32},
        "optim": {"lr": 3e-3, "micro_batch_size": MICRO, "warmup_steps": 0, "schedule": "constant"},
        "distill": {"signal": signal_name, "loss": "jsd", "beta": 0.3, "temperature": 2.0, "ce_weight": 0.5},
        "teacher": {
            "targets": [address],
            "prefetch": 2,
            "timeout_s": 30,
            "max_retries": 2,
            "data_plane": plane,
        },
        "checkpoint": {"export": False},
        "run": {"steps": steps, "out_dir": str(tmp / name), "seed": 0},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(cfg: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd += ["-m", "asymkd.cli", "train", "--config", str(cfg)]
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_full_and_hidden_over_the_torch_plane_train_like_full_over_grpc(
    tmp_path, tiny_teacher_dir, teacher, monkeypatch
):
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "corpus.jsonl")
    losses = {}
    for signal_name in ("full", "hidden"):
        for plane in ("grpc", "torch"):
            name = f"{signal_name}-{plane}"
            cfg = config(
                tmp_path,
                tiny_teacher_dir,
                teacher.address,
                name,
                signal_name=signal_name,
                plane=plane,
                steps=5,
            )
            proc = torchrun(cfg, tmp_path / f"{name}.log")
            assert proc.wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
            records = train_records(tmp_path / name)
            assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
            losses[name] = [(r["loss"], r["kd"], r["ce"]) for r in records]
    reference = losses["full-grpc"]
    for name, got in losses.items():
        for step, (a, b) in enumerate(zip(got, reference, strict=True)):
            assert all(abs(x - y) <= 1e-5 for x, y in zip(a, b, strict=True)), (name, step, a, b)
    assert all(0 < kd < 100 for _, kd, _ in reference) and reference[-1][0] < reference[0][0]
    log = teacher.log_path.read_text()
    assert log.count("peer joined (gloo)") >= 2 * WORLD and "closed by the peer" in log


def _rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The worker process of `rank` under a torchrun process (its environment says RANK)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == torchrun_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_the_teacher_serving_another_student(
    tmp_path, tiny_teacher_dir, teacher, monkeypatch
):
    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "corpus.jsonl")
    victim_cfg = config(
        tmp_path, tiny_teacher_dir, teacher.address, "victim", signal_name="full", plane="torch", steps=10**6
    )  # never finishes on its own: it runs ~25 steps/s here, faster elsewhere
    other_cfg = config(
        tmp_path, tiny_teacher_dir, teacher.address, "other", signal_name="hidden", plane="torch", steps=25
    )
    victim = torchrun(victim_cfg, tmp_path / "victim.log")
    other = None
    try:
        deadline = time.monotonic() + 90
        while len(train_records(tmp_path / "victim")) < 2:
            assert victim.poll() is None and time.monotonic() < deadline, (
                tmp_path / "victim.log"
            ).read_text()[-3000:]
            time.sleep(0.1)
        other = torchrun(other_cfg, tmp_path / "other.log")
        while len(train_records(tmp_path / "other")) < 2:
            assert other.poll() is None and time.monotonic() < deadline + 60, (
                tmp_path / "other.log"
            ).read_text()[-3000:]
            time.sleep(0.1)
        gone_before = teacher.log_path.read_text().count("peer gone")
        rank1 = _rank_pid(victim.pid, 1)
        assert victim.poll() is None and rank1 is not None, (tmp_path / "victim.log").read_text()[-3000:]
        os.kill(rank1, signal.SIGKILL)  # mid-run, sessions open, tensors in flight
        assert victim.wait(timeout=120) != 0
        assert other.wait(timeout=120) == 0, (tmp_path / "other.log").read_text()[-3000:]
    finally:
        for proc in (victim, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert [r["step"] for r in train_records(tmp_path / "other")] == list(range(1, 26))
    assert teacher.log_path.read_text().count("peer gone") > gone_before  # the dead rank's session, torn down
    assert teacher.proc.poll() is None
