"""`asymkd serve` on a port that is already taken: refused at start, one line naming the port, exit 1.

gRPC binds with SO_REUSEPORT by default, so a second server on a served port used to start, say "serving"
and take a share of the first one's new connections; the server now binds exclusively.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest

from asymkd.v1 import teacher_pb2 as pb
from asymkd.v1 import teacher_pb2_grpc
from teacher_server.launch import free_port

TIMEOUT_S = 60


def serve(*args: str) -> subprocess.CompletedProcess:
    """`asymkd serve ARGS`; a server that starts (instead of being refused) is killed at the timeout."""
    cmd = [sys.executable, "-m", "asymkd.cli", "serve", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the server started instead of refusing the port:\n{e.stderr}")


def test_a_second_server_on_a_served_port_is_refused(hf_teacher, tiny_teacher_dir):
    res = serve("--model", str(tiny_teacher_dir), "--host", "127.0.0.1", "--port", str(hf_teacher.port))
    assert res.returncode == 1, res.stderr
    line = f"asymkd serve: cannot listen on 127.0.0.1:{hf_teacher.port}: the port is taken ("
    assert res.stderr.startswith(line), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    # the first server still answers every new connection (with a shared port some would go elsewhere)
    request = pb.ScoreRequest(request_id="r", sequences=[pb.TokenSequence(token_ids=[1, 2, 3])], top_k=4)
    for _ in range(8):
        with grpc.insecure_channel(hf_teacher.address) as channel:
            reply = teacher_pb2_grpc.TeacherStub(channel).Score(request, timeout=TIMEOUT_S)
            assert reply.request_id == "r" and len(reply.results) == 1
    assert hf_teacher.proc.poll() is None


def test_a_taken_metrics_port_is_refused_naming_it(tiny_teacher_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        args = ["--model", str(tiny_teacher_dir), "--port", str(free_port()), "--metrics-port", str(taken)]
        res = serve(*args)
    assert res.returncode == 1, res.stderr
    line = f"asymkd serve: cannot listen on 127.0.0.1:{taken} (--metrics-port): the port is taken ("
    assert res.stderr.startswith(line), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
