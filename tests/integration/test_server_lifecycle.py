"""Process lifecycle of `asymkd serve`: health over start-up, graceful SIGTERM, --help, config errors."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc
from teacher_server.launch import free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "asymkd.v1.Teacher")
TIMEOUT_S = 60


@dataclass
class Spawned:
    proc: subprocess.Popen
    address: str
    log_path: Path
    seen: dict[str, list[int]] = field(default_factory=dict)  # per service: distinct statuses, in order
    teacher_rpc_while_loading: str = ""

    def log(self) -> str:
        return self.log_path.read_text()

    def last(self, service: str) -> int | None:
        return self.seen[service][-1] if self.seen.get(service) else None


def check(stub, service: str) -> int | None:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status
    except grpc.RpcError:
        return None


def watch_start_up(sp: Spawned, channel: grpc.Channel) -> None:
    """Poll health from right after spawn until SERVING, recording every status change per service."""
    health, teacher = health_pb2_grpc.HealthStub(channel), teacher_pb2_grpc.TeacherStub(channel)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and sp.proc.poll() is None:
        for service in SERVICES:
            status = check(health, service)
            seen = sp.seen.setdefault(service, [])
            if status is not None and (not seen or seen[-1] != status):
                seen.append(status)
        if sp.last("") == NOT_SERVING and not sp.teacher_rpc_while_loading:
            try:
                teacher.GetInfo(pb.GetInfoRequest(), timeout=5)
                sp.teacher_rpc_while_loading = "OK"
            except grpc.RpcError as e:
                sp.teacher_rpc_while_loading = f"{e.code().name}: {e.details()}"
        if all(sp.last(s) == SERVING for s in SERVICES):
            return
        time.sleep(0.02)
    raise AssertionError(f"server not SERVING (exit code {sp.proc.poll()}):\n{sp.log_path.read_text()}")


@pytest.fixture(scope="module")
def spawned(tiny_teacher_dir, tmp_path_factory):
    """A server whose batcher holds a lone request 1.5 s: a request stays in flight long enough to SIGTERM."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("lifecycle") / "teacher.log"
    args = ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-wait-ms", "1500"]
    cmd = [sys.executable, "-m", "asymkd.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    sp = Spawned(proc, f"127.0.0.1:{port}", log_path)
    try:
        with grpc.insecure_channel(sp.address) as channel:
            watch_start_up(sp, channel)
        yield sp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_is_not_serving_until_the_model_is_loaded(spawned):
    for service in SERVICES:
        assert spawned.seen[service] == [NOT_SERVING, SERVING], (service, spawned.seen)
    assert spawned.teacher_rpc_while_loading.startswith("UNAVAILABLE: teacher is loading")
    log = spawned.log()
    assert log.index("listening on") < log.index("[teacher]", log.index("listening on") + 1)
    assert f"(hf, vocab 512) on {spawned.address}" in log


def open_stream(teacher, first: pb.ScoreRequest, release: threading.Event):
    """A ScoreStream that sends `first`, then stays open (sending nothing) until `release` is set."""

    def requests():
        yield first
        release.wait(TIMEOUT_S)

    return teacher.ScoreStream(requests(), timeout=TIMEOUT_S)


def test_sigterm_drains_in_flight_requests_then_exits_zero(spawned):
    channel = grpc.insecure_channel(spawned.address)
    teacher, health = teacher_pb2_grpc.TeacherStub(channel), health_pb2_grpc.HealthStub(channel)
    seq = pb.TokenSequence(token_ids=list(range(64)))
    release = threading.Event()
    stream = open_stream(teacher, pb.ScoreRequest(request_id="streamed", sequences=[seq], top_k=4), release)
    in_flight = teacher.Score.future(pb.ScoreRequest(request_id="late", sequences=[seq], top_k=4), timeout=30)
    time.sleep(0.3)  # the batcher holds both for 1.5 s
    assert not in_flight.done()
    spawned.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    while check(health, "asymkd.v1.Teacher") != NOT_SERVING:
        assert time.monotonic() < t_term + 10, "health never turned NOT_SERVING"
        time.sleep(0.02)
    assert check(health, "") == NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:  # no new work while draining: clients go elsewhere
        teacher.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not in_flight.done()
    reply = in_flight.result()
    assert reply.request_id == "late" and len(reply.results) == 1
    # the open stream gets its answer, then ends with UNAVAILABLE instead of holding the drain up
    assert next(stream).request_id == "streamed"
    with pytest.raises(grpc.RpcError) as e:
        next(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    release.set()
    assert spawned.proc.wait(TIMEOUT_S) == 0
    assert time.monotonic() - t_term < 10  # well within drain_timeout_s (30 s)
    log = spawned.log()
    assert "stopping: draining" in log and "stopped" in log and "Traceback" not in log
    channel.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "asymkd.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_serve_help_lists_the_options():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    for flag in (
        "--config",
        "--model",
        "--max-batch-tokens",
        "--max-wait-ms",
        "--metrics-port",
        "--vllm.enforce-eager",
    ):
        assert flag in res.stdout


@pytest.mark.parametrize(
    "args, text",
    [
        (["--bogus-flag", "3"], "unknown config key 'bogus_flag'"),
        (["--max-top-k", "0"], "max_top_k=0"),
        (["--port", "abc"], "port: expected an integer"),
        (["--config", "/nonexistent/serve.yaml"], "/nonexistent/serve.yaml"),
    ],
)
def test_bad_config_exits_2_naming_the_key(args, text):
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr
    assert text in res.stderr and "Traceback" not in res.stderr


def test_unknown_yaml_key_exits_2(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: x\nmax_wait_ms: 2\nvllm:\n  enforce_eager: true\n  no_such_option: 1\n")
    res = run_cli("--config", str(cfg))
    assert res.returncode == 2 and "vllm.no_such_option" in res.stderr and "Traceback" not in res.stderr


def test_missing_model_exits_1_with_one_line(tmp_path):
    res = run_cli("--model", str(tmp_path / "nope"), "--port", "0")
    assert res.returncode == 1
    assert "could not load the teacher model" in res.stderr and "nope" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "env", "policy"),
    [
        ([], {}, "PASSIVE"),
        ([], {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
        (["--omp-wait-policy", "active"], {}, "ACTIVE"),
    ],
    ids=["default", "environment-wins", "key"],
)
def test_the_teachers_openmp_threads_sleep_when_idle_unless_told(
    tiny_teacher_dir, tmp_path, args, env, policy
):
    """A student on the same cores gets them while the teacher waits (OMP_WAIT_POLICY before torch loads)."""
    from teacher_server.launch import LocalTeacher

    clean = {"OMP_WAIT_POLICY": ""} | env  # the test runner's own setting must not leak in
    serve_args = ["--model", str(tiny_teacher_dir), "--backend", "hf", *args]
    with LocalTeacher(serve_args, log_path=tmp_path / "t.log", env=clean) as teacher:
        assert f"OpenMP wait policy {policy}" in teacher.log_path.read_text()
