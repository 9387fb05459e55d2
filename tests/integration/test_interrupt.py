"""A training run stopped on purpose, or by accident, loses nothing: SIGINT/SIGTERM write a checkpoint and say how
to resume (and the resumed run continues exactly), a killed rank brings the others down within a bound, and
the out_dir / resume rules refuse what would mix two runs.

Real `asymkd train` processes (one rank, or two under `python -m asymkd.torchrun`) on a small generated
corpus, CE-only with a constant learning rate so a resumed run can be compared step for step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asymkd.cli import train as train_main
from tests.integration.test_train_torchrun import read_metrics, write_config, write_corpus

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONSTANT_LR = {"schedule": "constant", "warmup_steps": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_student_dir):
    root = tmp_path_factory.mktemp("interrupt")
    return root, write_corpus(root / "corpus.txt"), tiny_student_dir


def config(setup, name: str, steps: int, **sections) -> tuple[Path, Path]:
    root, corpus, student = setup
    out = root / name
    run = {"steps": steps, "eval_every": 0}
    sections = {"optim": CONSTANT_LR, "checkpoint": {"every_steps": 0}, "run": run, **sections}
    return write_config(root / f"{name}.yaml", student, corpus, out, **sections), out


def start(cmd: list[str], cache: Path) -> subprocess.Popen:
    env = {**os.environ, "ASYMKD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: a signal to the group is what Ctrl-C sends
    )  # fmt: skip


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        path = out / "metrics.jsonl"
        if path.exists() and sum('"kind": "train"' in line for line in path.read_text().splitlines()) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def loss_at(out: Path, step: int) -> float:
    train, _ = read_metrics(out)
    return [r for r in train if r["step"] == step][-1]["loss"]


def test_ctrl_c_under_torchrun_checkpoints_every_rank_and_the_printed_command_resumes(setup, tmp_path):
    cfg, out = config(setup, "ctrl_c", steps=1000)
    launcher = ["-m", "asymkd.torchrun", "--standalone", "--nproc_per_node=2"]
    proc = start([*launcher, "-m", "asymkd.cli", "train", "--config", str(cfg)], setup[0] / "cache")
    wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # torchrun and both ranks, as a terminal's Ctrl-C
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stdout + stderr, stderr
    train, _ = read_metrics(out)
    stopped = train[-1]["step"]
    checkpoint = out / "checkpoints" / f"step_{stopped:07d}"
    assert (checkpoint / "done").exists() and not list((out / "checkpoints").glob("*.tmp"))
    assert {p.name for p in checkpoint.glob("trainer_rank*.pt")} == {"trainer_rank0.pt", "trainer_rank1.pt"}
    command = re.search(r"resume with: (.+)", stderr).group(1)
    assert command.startswith("python -m asymkd.torchrun --nproc_per_node=2 -m asymkd.cli train --config ")
    # the printed command, one step further, reproduces an uninterrupted run's next step
    resumed = start([*command.split()[1:], "--run.steps", str(stopped + 1)], setup[0] / "cache")
    assert resumed.wait(120) == 0, resumed.communicate()
    ref_cfg, ref_out = config(setup, "reference", steps=stopped + 1)
    reference = start([*launcher, "-m", "asymkd.cli", "train", "--config", str(ref_cfg)], setup[0] / "cache")
    assert reference.wait(120) == 0, reference.communicate()
    assert loss_at(out, stopped + 1) == pytest.approx(loss_at(ref_out, stopped + 1), abs=1e-6)


def test_sigterm_to_one_process_checkpoints_and_exits_143_without_a_traceback(setup):
    cfg, out = config(setup, "sigterm", steps=1000)
    proc = start(["-m", "asymkd.cli", "train", "--config", str(cfg)], setup[0] / "cache")
    wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    stopped = read_metrics(out)[0][-1]["step"]
    assert (out / "checkpoints" / f"step_{stopped:07d}" / "done").exists()
    assert f"resume with: asymkd train --config {out / 'config.yaml'} --checkpoint.resume true" in stderr


def test_a_killed_rank_brings_torchrun_down_within_a_bound(setup):
    cfg, out = config(setup, "killed", steps=1000)
    launcher = ["-m", "asymkd.torchrun", "--standalone", "--nproc_per_node=2"]
    proc = start([*launcher, "-m", "asymkd.cli", "train", "--config", str(cfg)], setup[0] / "cache")
    wait_for_step(out, 2, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ranks = [int(pid) for pid in children]
    assert len(ranks) == 2, ranks  # torchrun's two ranks
    t0 = time.monotonic()
    os.kill(ranks[-1], signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    for pid in ranks:  # the survivor was stopped too
        assert not Path(f"/proc/{pid}").exists(), f"rank {pid} left behind"


# ---- out_dir and resume rules (one rank, in this process) --------------------------------------------------
def test_a_used_out_dir_is_refused_unless_resumed_or_overwritten(setup, capsys):
    cfg, out = config(setup, "used", steps=2)
    assert train_main(["--config", str(cfg)]) == 0
    first = (out / "metrics.jsonl").read_text()
    assert train_main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "run.out_dir=" in err and "holds another run's files" in err and "run.overwrite=true" in err
    assert (out / "metrics.jsonl").read_text() == first  # nothing was touched
    assert train_main(["--config", str(cfg), "--run.overwrite", "true"]) == 0
    assert len(read_metrics(out)[0]) == 2  # replaced, not appended


def test_resume_rules(setup, capsys, caplog):
    cfg, out = config(setup, "resume", steps=3, checkpoint={"every_steps": 0})
    # nothing to resume from in a fresh folder: it says so and starts fresh
    assert train_main(["--config", str(cfg), "--checkpoint.resume", "true"]) == 0
    assert "no checkpoint in" in capsys.readouterr().err + caplog.text
    # fewer steps than the checkpoint holds: a config error naming both
    assert train_main(["--config", str(cfg), "--checkpoint.resume", "true", "--run.steps", "2"]) == 2
    assert re.search(
        r"run\.steps=2 is below the step of the checkpoint to resume from \(3", capsys.readouterr().err
    )
    # a save that never finished is neither resumed from nor left behind
    partial = out / "checkpoints" / "step_0000004.tmp"
    partial.mkdir()
    (partial / "done").write_text(json.dumps({"step": 4}))
    assert train_main(["--config", str(cfg), "--checkpoint.resume", "true", "--run.steps", "4"]) == 0
    assert [r["step"] for r in read_metrics(out)[0]][-1] == 4
    assert not partial.exists() and (out / "checkpoints" / "step_0000004" / "done").exists()
