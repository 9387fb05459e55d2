"""asymkd/hetjob.py, the logic of deploy/slurm/asymkd.sbatch: splitting RUN.yaml, the plan, the rendezvous
files and the bounded wait (no SLURM, no processes: scontrol is a stand-in function here; the real cluster
runs in tests/integration/test_slurm.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from asymkd import hetjob
from asymkd.config import ConfigError, load_config
from asymkd.local_run import RunConfig
from student_trainer.config import TrainConfig
from teacher_server.config import ServeConfig

NODES = {"t[1-4]": "t1 t2 t3 t4", "s[1-2]": "s1 s2", "s1": "s1"}


def fake_scontrol(*args: str) -> str:
    """`scontrol show hostnames LIST` / `scontrol show node -o NAME` as SLURM 22.05 prints them."""
    if args[:2] == ("show", "hostnames"):
        return "\n".join(NODES[args[2]].split()) + "\n"
    assert args[:3] == ("show", "node", "-o"), args
    index = int(args[3][1:])
    return f"NodeName={args[3]} Arch=x86_64 CoresPerSocket=2 NodeAddr=10.0.{ord(args[3][0])}.{index} "


def slurm_env(job_id: int = 123456, teachers: int = 1, students: int = 2, **extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NUM_NODES_HET_GROUP_0": str(teachers),
        "SLURM_JOB_NUM_NODES_HET_GROUP_1": str(students),
        "SLURM_JOB_NODELIST_HET_GROUP_0": "t[1-4]",
        "SLURM_JOB_NODELIST_HET_GROUP_1": "s[1-2]" if students > 1 else "s1",
    }
    return env | extra


def write_run(tmp_path: Path, **top) -> Path:
    run = {
        "serve": {
            "model": str(tmp_path / "teacher"),
            "backend": "hf",
            "max_top_k": 64,
            "drain_timeout_s": 12,
        },
        "train": {
            "model": {"tokenizer": "teacher", "hidden_size": 32, "num_layers": 1, "num_heads": 1},
            "data": {"paths": ["corpus.jsonl"], "seq_len": 32},
            "distill": {"top_k": 16},
            "run": {"steps": 3, "out_dir": str(tmp_path / "out")},
        },
        "nproc_per_node": 4,
        "student_threads": 2,
        "teacher_start_timeout_s": 90,
        **top,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def test_prepare_splits_run_yaml_into_serve_and_train_configs(tmp_path):
    run_file = write_run(tmp_path)
    job_dir = hetjob.prepare(run_file, slurm_env(), fake_scontrol)
    assert job_dir == tmp_path / "out" / "slurm-123456"
    cfg = load_config(RunConfig, run_file)
    assert load_config(ServeConfig, job_dir / "serve.yaml") == cfg.serve
    train = load_config(TrainConfig, job_dir / "train.yaml")
    # `asymkd run`'s layout and its "teacher" tokenizer; everything else as written
    assert train.run.out_dir == str(tmp_path / "out" / "kd")
    assert train.model.tokenizer == str(tmp_path / "teacher")
    assert (train.optim, train.distill, train.data) == (cfg.train.optim, cfg.train.distill, cfg.train.data)
    assert train.teacher.targets == []
    plan = hetjob.Plan.load(job_dir)
    assert (plan.replicas, plan.student_nodes, plan.nproc_per_node, plan.student_threads) == (1, 2, 4, 2)
    assert plan.teacher_port == 20000 + 3456 and plan.rdzv_endpoint == "10.0.115.1:33456"
    assert (plan.start_timeout_s, plan.stop_timeout_s) == (90, 12 + hetjob.STOP_MARGIN_S)


def test_ports_and_job_dir_follow_the_environment(tmp_path):
    env = slurm_env(ASYMKD_TEACHER_PORT="5001", ASYMKD_RDZV_PORT="5002", ASYMKD_JOB_DIR=str(tmp_path / "j"))
    job_dir = hetjob.prepare(write_run(tmp_path), env, fake_scontrol)
    plan = hetjob.Plan.load(job_dir)
    assert job_dir == tmp_path / "j" and plan.job_dir == str(job_dir)
    assert plan.teacher_port == 5001 and plan.rdzv_endpoint.endswith(":5002")


def test_vllm_nnodes_makes_replicas_span_teacher_nodes(tmp_path):
    serve = {"model": "m", "backend": "vllm", "pipeline_parallel_size": 2, "vllm": {"nnodes": 2}}
    plan = hetjob.Plan.load(
        hetjob.prepare(write_run(tmp_path, serve=serve), slurm_env(teachers=4), fake_scontrol)
    )
    assert (plan.teacher_nodes, plan.nodes_per_replica, plan.replicas) == (4, 2, 2)
    assert plan.vllm_master_port == 40000 + 3456
    with pytest.raises(ConfigError, match=r"serve.vllm.nnodes=2: the 3 teacher node\(s\)"):
        hetjob.prepare(write_run(tmp_path, serve=serve), slurm_env(teachers=3), fake_scontrol)


@pytest.mark.parametrize(
    "top, message",
    [
        ({"nproc_per_nodes": 2}, "unknown config key 'nproc_per_nodes'"),
        ({"serve": {"modle": "x"}}, "unknown config key 'serve.modle'"),
        ({"nproc_per_node": 0}, "nproc_per_node=0 must be >= 1"),
    ],
)
def test_a_bad_key_fails_with_one_line(tmp_path, capsys, monkeypatch, top, message):
    run_file = write_run(tmp_path, **top)
    with pytest.raises(ConfigError, match=message):
        hetjob.prepare(run_file, slurm_env(), fake_scontrol)
    monkeypatch.setattr(hetjob.os, "environ", slurm_env())
    assert hetjob.main(["prepare", str(run_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asymkd slurm: config error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the config is known good


def test_prepare_refuses_a_plain_job_and_an_in_process_teacher(tmp_path):
    with pytest.raises(ConfigError, match="SLURM_JOB_NUM_NODES_HET_GROUP_0/1 are not set"):
        hetjob.prepare(write_run(tmp_path), {"SLURM_JOB_ID": "7"}, fake_scontrol)
    train = yaml.safe_load(write_run(tmp_path).read_text())["train"]
    train["teacher"] = {"in_process": "default"}
    with pytest.raises(ConfigError, match="in_process/cache is set"):
        hetjob.prepare(write_run(tmp_path, train=train), slurm_env(), fake_scontrol)


def test_rendezvous_files_are_json_written_whole(tmp_path):
    path = hetjob.publish(tmp_path, 1, "10.0.0.7:21234", "gpu07", 4242)
    assert path == tmp_path / "teacher-1.json"
    assert json.loads(path.read_text()) == {
        "address": "10.0.0.7:21234",
        "node": "gpu07",
        "replica": 1,
        "pid": 4242,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["teacher-1.json"]  # no temp file left behind
    assert hetjob.read_rendezvous(tmp_path, 2) is None  # replica 0 missing
    hetjob.publish(tmp_path, 0, "10.0.0.6:21234", "gpu06", 11)
    assert hetjob.read_rendezvous(tmp_path, 2) == ["10.0.0.6:21234", "10.0.0.7:21234"]
    hetjob.report_failure(tmp_path, 3, "gpu09", 1, "[teacher] ERROR: could not load the teacher model x")
    with pytest.raises(
        hetjob.TeacherFailedError, match=r"gpu09 failed \(exit code 1\):\n.*could not load"
    ) as e:
        hetjob.read_rendezvous(tmp_path, 2)
    assert e.value.exit_code == 1


def published(rdv: Path, replicas: int):
    return lambda: hetjob.read_rendezvous(rdv, replicas)


def test_wait_returns_once_published_and_serving(tmp_path):
    serving: set[str] = set()
    threading.Timer(0.2, hetjob.publish, (tmp_path, 0, "10.0.0.6:1", "a", 1)).start()
    threading.Timer(0.4, serving.add, ("10.0.0.6:1",)).start()
    t0 = time.monotonic()
    found = hetjob.wait_serving(published(tmp_path, 1), 10, serving.__contains__, poll_s=0.02)
    assert found == ["10.0.0.6:1"] and 0.35 < time.monotonic() - t0 < 5


def test_wait_is_bounded(tmp_path):
    hetjob.publish(tmp_path, 0, "10.0.0.6:1", "a", 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"after 0 s \(not all published\)"):
        hetjob.wait_serving(published(tmp_path, 2), 0.3, lambda a: True, poll_s=0.02)
    with pytest.raises(TimeoutError, match=r"\(10.0.0.6:1: not all SERVING from here\)"):
        hetjob.wait_serving(published(tmp_path, 1), 0.3, lambda a: False, poll_s=0.02)
    assert time.monotonic() - t0 < 3


def test_wait_fails_at_once_when_a_teacher_fails(tmp_path):
    threading.Timer(0.1, hetjob.report_failure, (tmp_path, 0, "n1", 3, "boom")).start()
    t0 = time.monotonic()
    with pytest.raises(hetjob.TeacherFailedError, match="boom") as e:
        hetjob.wait_serving(published(tmp_path, 1), 600, lambda a: True, poll_s=0.02)
    assert e.value.exit_code == 3 and time.monotonic() - t0 < 3


def test_wait_command_waits_for_the_targets_of_a_train_config(tmp_path, monkeypatch, capsys):
    train = {"model": {"tokenizer": "tok"}, "data": {"builtin": "stdlib-docs"}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train | {"teacher": {"targets": ["dns:///teacher-headless:50051"]}}))
    asked: list[str] = []
    monkeypatch.setattr(hetjob, "_is_serving", lambda target, **_: asked.append(target) or len(asked) > 2)
    assert hetjob.run_wait(str(path), 30, poll_s=0.01) == 0
    assert asked == ["dns:///teacher-headless:50051"] * 3
    monkeypatch.setattr(hetjob, "_is_serving", lambda target, **_: False)
    t0 = time.monotonic()
    assert hetjob.run_wait(str(path), 0.2, poll_s=0.01) == 1 and time.monotonic() - t0 < 3
    path.write_text(yaml.safe_dump(train))
    assert hetjob.main(["wait", str(path)]) == 2
    assert "teacher.targets is empty" in capsys.readouterr().err


def test_student_config_fills_targets_and_torchrun_spans_the_student_nodes(tmp_path):
    job_dir = hetjob.prepare(write_run(tmp_path), slurm_env(), fake_scontrol)
    path = hetjob.student_config(job_dir, ["10.0.0.6:20001", "10.0.0.7:20001"])
    assert load_config(TrainConfig, path).teacher.targets == ["10.0.0.6:20001", "10.0.0.7:20001"]
    cmd = hetjob.torchrun_command(hetjob.Plan.load(job_dir), path)
    assert cmd[1:3] == ["-m", "asymkd.torchrun"]
    for arg in (
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.115.1:33456",
    ):
        assert arg in cmd
    assert cmd[-5:] == ["-m", "asymkd.cli", "train", "--config", str(path)]


def test_teacher_host_prefers_the_overrides_then_the_route_to_the_student_then_the_node_address():
    assert (
        hetjob.teacher_host({}, "t2", "127.0.0.1", fake_scontrol) == "127.0.0.1"
    )  # the route to the student
    assert hetjob.teacher_host({}, "t2", "", fake_scontrol) == "10.0.116.2"  # no route: NodeAddr
    assert (
        hetjob.teacher_host({"ASYMKD_TEACHER_IFNAME": "lo"}, "t2", "10.0.1.1", fake_scontrol) == "127.0.0.1"
    )
    assert hetjob.teacher_host({"ASYMKD_TEACHER_HOST": "192.0.2.1"}, "t2", "", fake_scontrol) == "192.0.2.1"
    with pytest.raises(ValueError, match="ASYMKD_TEACHER_IFNAME=nosuch0"):
        hetjob.interface_address("nosuch0")
    assert hetjob.hostnames("t[1-4]", fake_scontrol) == ["t1", "t2", "t3", "t4"]
