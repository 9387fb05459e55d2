"""deploy/slurm/asymkd.sbatch on a real SLURM cluster: slurmctld + two slurmd (virtual nodes n1, n2) on
loopback, with a private munged, private ports and temp dirs (other clusters may run on this machine).

The job runs unchanged, as a user submits it: `sbatch deploy/slurm/asymkd.sbatch run.yaml`, component 0 =
`asymkd serve` (the tiny teacher, hf backend) on n1, component 1 = 2-rank torchrun (gloo) on n2.
Daemons are stopped by PID in the fixture's teardown, jobs cancelled first, whatever the tests did.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from teacher_server.launch import free_port

REPO = Path(__file__).resolve().parents[2]
SBATCH_SCRIPT = REPO / "deploy" / "slurm" / "asymkd.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
JOB_TIMEOUT_S = 150
ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")

SLURM_CONF = """\
ClusterName=asymkdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
MinJobAge=3600
KillWait=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=2 RealMemory=4000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=2 RealMemory=4000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def which(name: str) -> str | None:
    """SLURM's daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


class Cluster:
    """munged + slurmctld + slurmd n1/n2, each a child process in the foreground (stopped by PID)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf"), "PATH": path}

    def start(self) -> None:
        missing = [d for d in DAEMONS if not which(d)]
        assert not missing, f"{missing} not installed: `make test` installs slurmctld slurmd munge (apt)"
        for sub in ("munge", "state", "spool/n1", "spool/n2", "log"):
            (self.root / sub).mkdir(parents=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        ports = {"ctld_port": free_port(), "n1_port": free_port(), "n2_port": free_port()}
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(dir=self.root, **ports))
        m = self.root / "munge"
        self._spawn(
            "munged", "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
            f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed", f"--log-file={self.root}/log/munged.log",
        )  # fmt: skip
        self._wait_for(lambda: (m / "munge.socket").exists(), "munged socket")
        self._spawn("slurmctld", "-D", "-i")
        self._spawn("slurmd", "-D", "-N", "n1")
        self._spawn("slurmd", "-D", "-N", "n2")
        self._wait_for(self._nodes_idle, "both nodes idle")

    def _spawn(self, *cmd: str) -> None:
        cmd = (which(cmd[0]), *cmd[1:])
        out = open(self.root / "log" / f"{cmd[0]}-{len(self.procs)}.out", "wb")  # noqa: SIM115
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env))
        out.close()

    def _wait_for(self, ready, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead, f"{dead} exited while waiting for {what}:\n{self.logs()}"
            if ready():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")

    def _nodes_idle(self) -> bool:
        res = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        return res.returncode == 0 and sorted(res.stdout.split()) == ["idle", "idle", "n1", "n2"]

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 60)
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").iterdir())
        )

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons (slurmd first) by PID."""
        if self.procs and self.procs[1:2] and self.procs[1].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                res = self.run("squeue", "-h", "-o", "%i", check=False)
                if res.returncode != 0 or not res.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    short = len(str(root / "munge" / "munge.socket")) < 100  # a unix socket name has at most 107 bytes
    cluster = Cluster(root if short else Path(tempfile.mkdtemp(prefix="asymkd-slurm-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if not short:
            shutil.rmtree(cluster.root, ignore_errors=True)


def write_corpus(path: Path) -> None:
    import argparse
    import logging

    docs = [inspect.getdoc(obj) for mod in (argparse, logging) for obj in vars(mod).values()]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d and len(d) > 80))


def run_yaml(tmp_path: Path, teacher_dir: Path | str, **top) -> Path:
    """An `asymkd run` file: the tiny teacher served with hf, a 2-rank random-init student, 4 steps."""
    write_corpus(tmp_path / "corpus.jsonl")
    run = {
        "serve": {"model": str(teacher_dir), "backend": "hf", "max_top_k": 64, "drain_timeout_s": 20},
        "train": {
            "model": {"tokenizer": "teacher", "hidden_size": 32, "num_layers": 2, "num_heads": 1},
            "data": {"paths": [str(tmp_path / "corpus.jsonl")], "seq_len": 32},
            "optim": {"lr": 3e-3, "micro_batch_size": 2, "schedule": "constant"},
            "distill": {"top_k": 16},
            "teacher": {"timeout_s": 30},
            "run": {"steps": 4, "out_dir": "run"},  # relative: to the submit dir, as on a laptop
        },
        "nproc_per_node": 2,
        "teacher_threads": 1,
        "student_threads": 1,
        "teacher_start_timeout_s": 120,
        **top,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def submit(cluster: Cluster, tmp_path: Path, run_file: Path) -> tuple[int, str, str, float]:
    """Submit the script from tmp_path as a user would and poll until the job ends (bounded);
    (the job's exit code, job id, the job's log, seconds)."""
    env = {
        "ASYMKD_VENV": sys.prefix,
        "ASYMKD_TEACHER_PORT": str(free_port()),
        "ASYMKD_RDZV_PORT": str(free_port()),
        "ASYMKD_CACHE": str(tmp_path / "cache"),
    }
    t0 = time.monotonic()
    res = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", str(SBATCH_SCRIPT), str(run_file)],
        env={**cluster.env, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip(), f"sbatch: {res.stdout}{res.stderr}\n{cluster.logs()}"
    job_id = res.stdout.strip().split(";")[0].split("+")[0]
    states = job_states(cluster, job_id)
    while any(state in ACTIVE for state, _ in states):  # sbatch --wait polls far less often
        assert time.monotonic() - t0 < JOB_TIMEOUT_S, f"job {job_id} still {states}\n{cluster.logs()}"
        time.sleep(0.5)
        states = job_states(cluster, job_id)
    seconds = time.monotonic() - t0
    log = (tmp_path / f"job-{job_id}.out").read_text()
    return int(states[0][1].split(":")[0]), job_id, log, seconds


def job_states(cluster: Cluster, job_id: str) -> list[tuple[str, str]]:
    """(JobState, ExitCode) of each component, from the controller's memory (MinJobAge; no accounting)."""
    text = cluster.run("scontrol", "show", "job", job_id).stdout
    return re.findall(r"JobState=(\S+).*?ExitCode=(\S+)", text, flags=re.S)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.slow
def test_hetjob_serves_the_teacher_trains_the_student_and_drains(cluster, tmp_path, tiny_teacher_dir):
    rc, job_id, log, seconds = submit(cluster, tmp_path, run_yaml(tmp_path, tiny_teacher_dir))
    assert rc == 0, f"{log}\n{cluster.logs()}"
    assert job_states(cluster, job_id) == [("COMPLETED", "0:0"), ("COMPLETED", "0:0")]
    job_dir = tmp_path / "run" / f"slurm-{job_id}"
    assert (job_dir / "exit_code").read_text().strip() == "0"
    # the student: 2 ranks, 4 steps, against the published teacher, exported as `asymkd run` would
    published = json.loads((job_dir / "rendezvous" / "teacher-0.json").read_text())
    assert published["node"] == "n1" and published["address"].startswith("127.0.0.1:")
    train = yaml.safe_load((job_dir / "train-targets.yaml").read_text())
    assert train["teacher"]["targets"] == [published["address"]]
    assert (tmp_path / "run" / "kd" / "final" / "config.json").is_file()
    steps = [json.loads(x) for x in (tmp_path / "run" / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "train"] == [1, 2, 3, 4]
    assert "teacher SERVING at " + published["address"] in log
    # the teacher was drained (SIGTERM), exited 0, and is gone
    teacher_log = (job_dir / "teacher-0.log").read_text()
    assert "stopping: draining" in teacher_log and "[teacher] stopped" in teacher_log
    assert "teacher step exited with code 0; student exit code 0" in log
    assert not alive(published["pid"])
    assert seconds < 120


def test_a_teacher_that_cannot_start_fails_the_job_at_once(cluster, tmp_path):
    missing = tmp_path / "no-such-model"
    run_file = run_yaml(tmp_path, missing, teacher_start_timeout_s=600)
    rc, job_id, log, seconds = submit(cluster, tmp_path, run_file)
    assert rc != 0
    assert seconds < 60, f"took {seconds:.0f} s: the job waited instead of failing fast\n{log}"
    assert "could not load the teacher model" in log and "no-such-model" in log  # the teacher's own error
    assert [state for state, _ in job_states(cluster, job_id)] == ["FAILED", "FAILED"]
    job_dir = tmp_path / "run" / f"slurm-{job_id}"
    assert (job_dir / "exit_code").read_text().strip() == str(rc)
    assert not (job_dir / "rendezvous" / "teacher-0.json").exists()


def test_a_bad_key_in_run_yaml_fails_the_job_with_one_line(cluster, tmp_path):
    run_file = run_yaml(tmp_path, "unused", nproc_per_nodes=2)
    rc, _, log, seconds = submit(cluster, tmp_path, run_file)
    assert rc == 2, log
    errors = [line for line in log.splitlines() if "config error" in line]
    assert errors == ["asymkd slurm: config error: unknown config key 'nproc_per_nodes'"], log
    assert "Traceback" not in log and seconds < 30
