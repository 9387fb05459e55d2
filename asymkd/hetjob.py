"""SLURM heterogeneous jobs: the logic behind deploy/slurm/asymkd.sbatch, kept out of bash and unit-tested.

    python -m asymkd.hetjob prepare RUN.yaml   # batch script: check RUN.yaml as `asymkd run` does, split it into
                                               # serve.yaml + train.yaml + plan.json in the job's folder, print it
    python -m asymkd.hetjob teacher JOB_DIR    # each teacher node (srun --het-group=0): `asymkd serve` on this
                                               # node's address; published once SERVING; drained on `stop`
    python -m asymkd.hetjob student JOB_DIR    # each student node (srun --het-group=1): wait for the teachers
                                               # (bounded), fill teacher.targets, exec torchrun
    python -m asymkd.hetjob wait TRAIN_YAML    # until its teacher.targets say SERVING (the Kubernetes student's
                                               # init container, deploy/k8s)

RUN.yaml is the `asymkd run` file. The job's folder, `<train.run.out_dir>/slurm-<job id>` (or $ASYMKD_JOB_DIR),
must be on a file system every node sees; the student trains into `<train.run.out_dir>/kd` as `asymkd run`
does. The rendezvous, in `<job dir>/rendezvous/`:

    teacher-<replica>.json   {"address": "10.0.0.7:21234", "node": "gpu07", "replica": 0, "pid": 4242}
                             written atomically once the server's gRPC health says SERVING for asymkd.v1.Teacher
    teacher-<task>.failed    {"node": ..., "exit_code": 1, "error": "<the end of the teacher's log>"}
    stop                     touched by the batch script when the student is done: every teacher drains

Addresses: a teacher listens on the address its node reaches the first student node from (whose address is its
SLURM NodeAddr, `scontrol show node`), unless $ASYMKD_TEACHER_HOST (an address) or $ASYMKD_TEACHER_IFNAME (an
interface, e.g. ib0) says otherwise. Ports are deterministic per job (the variables override them): gRPC
$ASYMKD_TEACHER_PORT = 20000 + job id % 10000, torchrun's rendezvous $ASYMKD_RDZV_PORT = 30000 + job id % 10000
on the first student node, vLLM's multi-node master port = serve.vllm.master_port or 40000 + job id % 10000.
serve.vllm.nnodes > 1 makes one replica span that many teacher nodes (vLLM pipeline/tensor parallel across
nodes); otherwise every teacher node is a replica.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from grpc_health.v1 import health_pb2

from asymkd.config import ConfigError, dump_config, load_config
from teacher_server.launch import LocalTeacher, health_status
from teacher_server.security import ClientSecurity

log = logging.getLogger("asymkd.slurm")
SERVICE_NAME = "asymkd.v1.Teacher"
SERVING = health_pb2.HealthCheckResponse.SERVING
STOP_MARGIN_S = 30.0  # on top of serve.drain_timeout_s before a teacher is killed


class TeacherFailedError(RuntimeError):
    """A teacher could not start (or died): `exit_code` and the end of its log in the message."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code or 1


@dataclass
class Plan:
    """What every step of the job needs, written once by `prepare` as plan.json."""

    job_id: str
    job_dir: str
    teacher_nodes: int
    nodes_per_replica: int
    teacher_port: int
    vllm_master_port: int
    student_nodes: int
    nproc_per_node: int
    rdzv_endpoint: str
    start_timeout_s: float
    stop_timeout_s: float
    teacher_threads: int = 0
    student_threads: int = 0

    @property
    def replicas(self) -> int:
        return self.teacher_nodes // self.nodes_per_replica

    def save(self) -> None:
        Path(self.job_dir, "plan.json").write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, job_dir: str | Path) -> Plan:
        return cls(**json.loads((Path(job_dir) / "plan.json").read_text()))


# ------------------------------------------------------------------------------------------------ nodes
def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def hostnames(nodelist: str, scontrol: Callable[..., str] = _scontrol) -> list[str]:
    """`n[1-3]` -> ["n1", "n2", "n3"] (SLURM's own expansion)."""
    return scontrol("show", "hostnames", nodelist).split()


def node_address(node: str, scontrol: Callable[..., str] = _scontrol) -> str:
    """The node's NodeAddr (what SLURM itself uses to reach it), as an IPv4 address when it resolves to one."""
    found = re.search(r"\bNodeAddr=(\S+)", scontrol("show", "node", "-o", node))
    addr = found.group(1) if found else node
    try:
        return socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except OSError:
        return addr  # let gRPC / torch resolve it


def interface_address(ifname: str) -> str:
    """The IPv4 address of a network interface (SIOCGIFADDR), e.g. "lo" -> "127.0.0.1"."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
        except OSError as e:
            raise ValueError(f"ASYMKD_TEACHER_IFNAME={ifname}: no IPv4 address ({e})") from None
    return socket.inet_ntoa(packed[20:24])


def route_address(peer: str) -> str:
    """The local address the kernel would use to reach `peer` (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def teacher_host(
    env: Mapping[str, str], node: str, student: str = "", scontrol: Callable[..., str] = _scontrol
) -> str:
    """Where this node's teacher listens (and is published): $ASYMKD_TEACHER_HOST, $ASYMKD_TEACHER_IFNAME's
    address, else the address this node reaches the first student node from (right where a host name resolves
    to 127.0.1.1 locally), else the node's NodeAddr."""
    if env.get("ASYMKD_TEACHER_HOST"):
        return env["ASYMKD_TEACHER_HOST"]
    if env.get("ASYMKD_TEACHER_IFNAME"):
        return interface_address(env["ASYMKD_TEACHER_IFNAME"])
    if student:
        try:
            return route_address(student)
        except (OSError, UnicodeError):
            pass
    return node_address(node, scontrol)


def job_port(env: Mapping[str, str], name: str, base: int, job_id: str) -> int:
    """$name if set, else base + job id % 10000 (jobs sharing a node get different ports)."""
    return int(env[name]) if env.get(name) else base + int(job_id) % 10000


# ---------------------------------------------------------------------------------------------- prepare
def prepare(run_yaml: str | Path, env: Mapping[str, str], scontrol: Callable[..., str] = _scontrol) -> Path:
    """Validate RUN.yaml exactly as `asymkd run` does, write serve.yaml, train.yaml and plan.json; the job dir."""
    from asymkd.local_run import TEACHER_TOKENIZER, RunConfig, teacher_model_dir, with_teacher_tokenizer

    cfg = load_config(RunConfig, run_yaml)  # ConfigError: one line naming the key
    teacher = cfg.train.teacher
    if teacher.in_process is not None or teacher.cache:
        raise ConfigError("train.teacher: in_process/cache is set, but a SLURM job serves the teacher itself")
    if cfg.compare_ce_only:
        log.warning("compare_ce_only is ignored in a SLURM job (run `asymkd train` with no teacher for it)")
    job_id = env.get("SLURM_JOB_ID", "0")
    out_dir = Path(cfg.train.run.out_dir).expanduser().absolute()
    job_dir = Path(env.get("ASYMKD_JOB_DIR") or out_dir / f"slurm-{job_id}").absolute()
    nodes = [env.get(f"SLURM_JOB_NUM_NODES_HET_GROUP_{group}") for group in (0, 1)]
    if not all(nodes):
        raise ConfigError(
            "SLURM_JOB_NUM_NODES_HET_GROUP_0/1 are not set: submit a heterogeneous job "
            "(sbatch deploy/slurm/asymkd.sbatch RUN.yaml; component 0 = teacher, 1 = student)"
        )
    teacher_nodes, student_nodes = int(nodes[0]), int(nodes[1])
    per_replica = cfg.serve.vllm.nnodes
    if teacher_nodes % per_replica:
        raise ConfigError(
            f"serve.vllm.nnodes={per_replica}: the {teacher_nodes} teacher node(s) are not a whole number "
            "of replicas (give component 0 a multiple of serve.vllm.nnodes nodes)"
        )
    head = node_address(hostnames(env["SLURM_JOB_NODELIST_HET_GROUP_1"], scontrol)[0], scontrol)
    train = cfg.train
    if TEACHER_TOKENIZER in (train.model.tokenizer, train.model.path):
        train = with_teacher_tokenizer(train, teacher_model_dir(cfg.serve).absolute())
    train = dataclasses.replace(train, run=dataclasses.replace(train.run, out_dir=str(out_dir / "kd")))
    (job_dir / "rendezvous").mkdir(parents=True, exist_ok=True)
    for stale in (job_dir / "rendezvous").iterdir():  # a resubmission with the same job dir
        stale.unlink()
    dump_config(cfg, job_dir / "run.yaml")
    dump_config(cfg.serve, job_dir / "serve.yaml")
    dump_config(train, job_dir / "train.yaml")
    Plan(
        job_id=job_id,
        job_dir=str(job_dir),
        teacher_nodes=teacher_nodes,
        nodes_per_replica=per_replica,
        teacher_port=job_port(env, "ASYMKD_TEACHER_PORT", 20000, job_id),
        vllm_master_port=cfg.serve.vllm.master_port or 40000 + int(job_id) % 10000,
        student_nodes=student_nodes,
        nproc_per_node=cfg.nproc_per_node,
        rdzv_endpoint=f"{head}:{job_port(env, 'ASYMKD_RDZV_PORT', 30000, job_id)}",
        start_timeout_s=cfg.teacher_start_timeout_s,
        stop_timeout_s=cfg.serve.drain_timeout_s + STOP_MARGIN_S,
        teacher_threads=cfg.teacher_threads,
        student_threads=cfg.student_threads,
    ).save()
    return job_dir


# ------------------------------------------------------------------------------------------- rendezvous
def _write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)`, then rename: readers on other nodes see the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def publish(rdv_dir: Path, replica: int, address: str, node: str, pid: int) -> Path:
    record = json.dumps({"address": address, "node": node, "replica": replica, "pid": pid})
    return _write_atomic(rdv_dir / f"teacher-{replica}.json", lambda p: p.write_text(record))


def report_failure(rdv_dir: Path, task: int, node: str, exit_code: int, error: str) -> Path:
    record = json.dumps({"node": node, "exit_code": exit_code, "error": error})
    return _write_atomic(rdv_dir / f"teacher-{task}.failed", lambda p: p.write_text(record))


def read_rendezvous(rdv_dir: Path, replicas: int) -> list[str] | None:
    """The published addresses in replica order once all `replicas` are there (else None); raises
    TeacherFailedError as soon as any teacher reported a failure."""
    for failed in sorted(rdv_dir.glob("teacher-*.failed")):
        info = json.loads(failed.read_text())
        raise TeacherFailedError(
            f"the teacher on {info['node']} failed (exit code {info['exit_code']}):\n{info['error']}",
            int(info["exit_code"]),
        )
    records = [rdv_dir / f"teacher-{r}.json" for r in range(replicas)]
    if not all(p.is_file() for p in records):
        return None
    return [json.loads(p.read_text())["address"] for p in records]


def _is_serving(target: str, security: ClientSecurity | None = None) -> bool:
    return health_status(target, SERVICE_NAME, security=security) == SERVING


def teacher_security(train_yaml: str | Path) -> ClientSecurity:
    """How this job reaches its teachers: the TLS keys of the train config's teacher section (the student's own
    client certificate and CA; health answers without the token)."""
    from student_trainer.config import TrainConfig

    t = load_config(TrainConfig, train_yaml).teacher
    return ClientSecurity.build(
        tls_ca=t.tls_ca or None, tls_cert=t.tls_cert or None, tls_key=t.tls_key or None,
        tls_server_name=t.tls_server_name or None,
    )  # fmt: skip


def wait_serving(
    targets: list[str] | Callable[[], list[str] | None],
    timeout_s: float,
    is_serving: Callable[[str], bool] | None = None,
    poll_s: float = 0.25,
) -> list[str]:
    """Block until every target says SERVING from here; the targets. `targets`: host:port or gRPC URIs (for
    dns:///name:port, one of its addresses), or a function giving them once known (None before: the
    rendezvous; it raises TeacherFailedError at once). `is_serving(target)`: default a plaintext health check.
    TimeoutError at the bound."""
    find = targets if callable(targets) else lambda: targets
    is_serving = is_serving or _is_serving
    deadline = time.monotonic() + timeout_s
    while True:
        found = find()
        if found is not None and all(is_serving(t) for t in found):
            return found
        if time.monotonic() >= deadline:
            state = f"{', '.join(found)}: not all SERVING from here" if found else "not all published"
            raise TimeoutError(f"no SERVING teacher after {timeout_s:.0f} s ({state})")
        time.sleep(poll_s)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log at {path}: {e})"


# ---------------------------------------------------------------------------------------------- teacher
class _StopRequested(Exception):
    """The batch script (or a signal) asked the teacher to stop while it was starting."""


class NodeTeacher(LocalTeacher):
    """LocalTeacher whose start-up wait also ends on a stop request; a non-head node of a multi-node replica
    has no gRPC health to wait for (its head serves)."""

    def __init__(self, *args, head: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.head = head
        self.should_stop: Callable[[], bool] = lambda: False

    def wait_serving(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"exited with code {self.proc.returncode} during start-up")
            if self.should_stop():
                raise _StopRequested
            if not self.head or _is_serving(self.address, self.security):
                return
            time.sleep(0.25)
        raise TimeoutError(f"was not SERVING after {self.start_timeout_s:.0f} s")


def run_teacher(job_dir: Path, env: Mapping[str, str]) -> int:
    """Serve on this node until the stop file (or SIGTERM); publish once SERVING; the server's exit code.
    A teacher that cannot start (or dies) leaves `teacher-<task>.failed` with the end of its log."""
    plan = Plan.load(job_dir)
    rdv = job_dir / "rendezvous"
    task, node = int(env.get("SLURM_PROCID", "0")), env.get("SLURMD_NODENAME", socket.gethostname())
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    log_path = job_dir / f"teacher-{task}.log"
    try:
        teacher = _build_teacher(plan, env, task, node, log_path)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        report_failure(rdv, task, node, 1, f"{type(e).__name__}: {e}")
        log.error("the teacher on %s cannot start: %s", node, e)
        return 1
    teacher.should_stop = lambda: stopped.is_set() or (rdv / "stop").exists()
    replica = task // plan.nodes_per_replica
    log.info("starting the teacher on %s (%s, replica %d); log: %s", node, teacher.address, replica, log_path)
    try:
        teacher.start()
        if teacher.head:
            publish(rdv, replica, teacher.address, node, teacher.proc.pid)
            log.info("teacher SERVING at %s: published", teacher.address)
        while teacher.proc.poll() is None and not teacher.should_stop():
            time.sleep(0.5)
        if teacher.proc.poll() is not None:
            raise RuntimeError(f"exited with code {teacher.proc.returncode} while serving")
    except _StopRequested:
        log.info("stop requested during start-up")
    except (RuntimeError, TimeoutError) as e:
        code = teacher.stop(plan.stop_timeout_s) or 1
        error = _log_tail(log_path)
        report_failure(rdv, task, node, code, error)
        log.error("the teacher on %s %s; the end of %s:\n%s", node, e, log_path, error)
        return code
    log.info("draining the teacher (at most %.0f s)", plan.stop_timeout_s)
    code = teacher.stop(plan.stop_timeout_s)
    log.info("teacher stopped (exit code %s)", code)
    return code or 0


def _build_teacher(plan: Plan, env: Mapping[str, str], task: int, node: str, log_path: Path) -> NodeTeacher:
    """The `asymkd serve` of this node: serve.yaml + its address and port (+ its rank in a multi-node replica)."""
    replica, rank = divmod(task, plan.nodes_per_replica)
    args = ["--config", str(Path(plan.job_dir) / "serve.yaml")]
    if plan.nodes_per_replica > 1:
        nodes = hostnames(env["SLURM_JOB_NODELIST_HET_GROUP_0"])
        master = node_address(nodes[replica * plan.nodes_per_replica])
        args += ["--vllm.nnodes", str(plan.nodes_per_replica), "--vllm.node_rank", str(rank)]
        args += ["--vllm.master_addr", master, "--vllm.master_port", str(plan.vllm_master_port)]
    threads = {"OMP_NUM_THREADS": str(plan.teacher_threads)} if plan.teacher_threads else None
    host = teacher_host(env, node, student=plan.rdzv_endpoint.rpartition(":")[0])
    teacher = NodeTeacher(
        args, host=host, port=plan.teacher_port, start_timeout_s=plan.start_timeout_s, log_path=log_path,
        env=threads, head=rank == 0,
    )  # fmt: skip
    teacher.security = teacher_security(Path(plan.job_dir) / "train.yaml")  # a TLS server: checked over TLS
    return teacher


# ---------------------------------------------------------------------------------------------- student
def torchrun_command(plan: Plan, train_yaml: Path) -> list[str]:
    """torchrun (asymkd.torchrun: a stop prints one line, not its traceback) across the student nodes, c10d
    rendezvous on the first of them (node ranks by arrival)."""
    return [
        sys.executable, "-m", "asymkd.torchrun",
        f"--nnodes={plan.student_nodes}", f"--nproc_per_node={plan.nproc_per_node}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={plan.rdzv_endpoint}", f"--rdzv_id=asymkd-{plan.job_id}",
        "-m", "asymkd.cli", "train", "--config", str(train_yaml),
    ]  # fmt: skip


def student_config(job_dir: Path, targets: list[str]) -> Path:
    """train.yaml with teacher.targets filled in, as train-targets.yaml (the same on every student node)."""
    from student_trainer.config import TrainConfig

    train = load_config(TrainConfig, job_dir / "train.yaml")
    train = dataclasses.replace(train, teacher=dataclasses.replace(train.teacher, targets=targets))
    return _write_atomic(job_dir / "train-targets.yaml", lambda p: dump_config(train, p))


def run_student(job_dir: Path, env: Mapping[str, str]) -> int:
    """Wait for the teachers, then exec torchrun (returns only on failure)."""
    plan = Plan.load(job_dir)
    log.info("waiting for %d teacher replica(s) (at most %.0f s)", plan.replicas, plan.start_timeout_s)
    published = lambda: read_rendezvous(job_dir / "rendezvous", plan.replicas)  # noqa: E731
    try:  # a little longer than the teachers' own bound: their timeout message comes first
        security = teacher_security(job_dir / "train.yaml")
        is_serving = functools.partial(_is_serving, security=security)
        targets = wait_serving(published, plan.start_timeout_s + 30, is_serving)
    except TeacherFailedError as e:
        log.error("%s", e)
        return e.exit_code
    except TimeoutError as e:
        log.error("%s", e)
        return 1
    config = student_config(job_dir, targets)
    cmd = torchrun_command(plan, config)
    child_env = dict(env)
    if plan.student_threads:
        child_env["OMP_NUM_THREADS"] = str(plan.student_threads)
    log.info("teachers SERVING at %s; %s", ", ".join(targets), " ".join(cmd))
    sys.stderr.flush()
    os.execve(cmd[0], cmd, child_env)
    return 1  # not reached


def run_wait(train_yaml: str, timeout_s: float, poll_s: float = 1.0) -> int:
    """`wait`: 0 once every teacher.targets of the train config says SERVING, 1 at the bound."""
    from student_trainer.config import TrainConfig

    targets = load_config(TrainConfig, train_yaml).teacher.targets
    if not targets:
        raise ConfigError(f"{train_yaml}: teacher.targets is empty: there is no teacher to wait for")
    log.info("waiting for %s to say SERVING (at most %.0f s)", ", ".join(targets), timeout_s)
    is_serving = functools.partial(_is_serving, security=teacher_security(train_yaml))
    try:
        wait_serving(targets, timeout_s, is_serving, poll_s=poll_s)
    except TimeoutError as e:
        log.error("%s", e)
        return 1
    log.info("SERVING")
    return 0


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asymkd.hetjob", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="validate and split RUN.yaml; print the job dir").add_argument("run_yaml")
    sub.add_parser("teacher", help="serve on this node (srun --het-group=0)").add_argument("job_dir")
    sub.add_parser("student", help="wait, then torchrun (srun --het-group=1)").add_argument("job_dir")
    wait = sub.add_parser("wait", help="until the teacher.targets of a train config say SERVING")
    wait.add_argument("train_yaml")
    wait.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    prefix = " ".join(["[slurm", args.command, os.environ.get("SLURMD_NODENAME", "")]).strip() + "]"
    logging.basicConfig(level=logging.INFO, format=f"{prefix} %(message)s", stream=sys.stderr)
    env = os.environ
    try:
        if args.command == "teacher":
            return run_teacher(Path(args.job_dir), env)
        if args.command == "student":
            return run_student(Path(args.job_dir), env)
        if args.command == "wait":
            return run_wait(args.train_yaml, args.timeout_s)
        print(prepare(args.run_yaml, env))
        return 0
    except ConfigError as e:
        print(f"asymkd slurm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
