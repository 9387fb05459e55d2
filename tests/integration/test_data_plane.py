"""The tensor data plane against a real teacher server on loopback: real gloo pair groups, real processes.

FULL / HIDDEN rows over the torch data plane equal the rows gRPC carries; a peer without the one-time token is
refused; a session the teacher does not know is FAILED_PRECONDITION; a peer SIGKILLed mid-session is torn
down at once and the teacher keeps serving the others; the output layer it serves is the model's own.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import torch

from asymkd.wire import ScoreQuery
from student_trainer.sources.data_plane import DataPlaneClient, DataPlaneError
from teacher_server.client import TeacherClient, TeacherError

VOCAB = 512


def rand_seqs(seed: int, lengths=(40, 25, 33)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def client(hf_teacher):
    with TeacherClient([hf_teacher.address], timeout_s=60) as c:
        yield c


def join(client: TeacherClient, offer=None) -> DataPlaneClient:
    return DataPlaneClient(offer or client.open_data_plane("gloo"), "127.0.0.1")


def wait_for_log(path, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the teacher log within {timeout_s} s:\n{path.read_text()[-2000:]}")


@pytest.mark.parametrize("signal_name", ["full", "hidden"])
def test_rows_over_the_torch_plane_equal_the_grpc_rows(client, signal_name):
    plane = join(client)
    try:
        seqs = rand_seqs(1)
        kw = dict(score_from=[0, 3, 30], signal=signal_name, temperature=1.5)
        remote = client.score_query(
            ScoreQuery(seqs, data_plane_session=plane.offer.session, **kw), fetch_remote=plane.fetch_async
        )
        local = client.score_query(ScoreQuery(seqs, **kw))
        streamed = list(
            client.score_stream(
                [ScoreQuery(seqs, data_plane_session=plane.offer.session, **kw)] * 3,
                max_in_flight=3,
                fetch_remote=plane.fetch_async,
            )
        )
        for got in [remote, *streamed]:
            for a, b in zip(got, local, strict=True):
                assert a.tensors().keys() == b.tensors().keys()
                for name, t in b.tensors().items():
                    assert torch.equal(getattr(a, name), t), name
        rows = sum(len(s) - 1 - sf for s, sf in zip(seqs, [0, 3, 30], strict=True))
        assert plane.received_bytes == 4 * rows * 4 * (VOCAB if signal_name == "full" else 64)
    finally:
        plane.close()


def test_a_peer_without_the_token_is_refused_and_the_teacher_keeps_serving(client, hf_teacher):
    offer = client.open_data_plane("gloo")
    with pytest.raises(DataPlaneError, match="refused"):
        join(client, dataclasses.replace(offer, token=b"x" * 32))
    wait_for_log(hf_teacher.log_path, f"session {offer.session}: peer refused")
    with pytest.raises(
        DataPlaneError, match="could not join"
    ):  # one rendezvous per offer, even with the token
        DataPlaneClient(dataclasses.replace(offer, timeout_s=3.0), "127.0.0.1")
    plane = join(client)
    try:
        (s,) = client.score_query(
            ScoreQuery(rand_seqs(2)[:1], signal="full", data_plane_session=plane.offer.session),
            fetch_remote=plane.fetch_async,
        )
        assert s.full.shape == (39, VOCAB)
    finally:
        plane.close()


def test_an_unknown_session_is_failed_precondition_before_any_work(client):
    with pytest.raises(TeacherError) as e:
        client.score_query(ScoreQuery(rand_seqs(3), signal="full", data_plane_session="nope"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "data_plane_session" in e.value.details and "OpenDataPlane" in e.value.details
    with pytest.raises(TeacherError) as e:  # a backend this CPU teacher does not offer
        client.open_data_plane("nccl")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "backend" in e.value.details


PEER = textwrap.dedent(
    """
    import sys, time, torch
    from asymkd.wire import ScoreQuery
    from student_trainer.sources.data_plane import DataPlaneClient
    from teacher_server.client import TeacherClient
    c = TeacherClient([sys.argv[1]], timeout_s=60)
    plane = DataPlaneClient(c.open_data_plane("gloo"), "127.0.0.1")
    seqs = [torch.arange(50) % 512]
    c.score_query(ScoreQuery(seqs, signal="full", data_plane_session=plane.offer.session), fetch_remote=plane.fetch_async)
    print(plane.offer.session, flush=True)
    try:  # the rows are held by the teacher, never fetched: no fetch_remote here
        c.score_query(ScoreQuery(seqs, signal="full", data_plane_session=plane.offer.session))
    except Exception as e:
        print("held" if "no fetch_remote" in str(e) else repr(e), flush=True)
    time.sleep(600)
    """
)


def test_a_peer_killed_mid_session_is_torn_down_and_others_are_served(client, hf_teacher):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, hf_teacher.address], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        session = peer.stdout.readline().strip()
        assert peer.stdout.readline().strip() == "held", "the peer did not get its answers"
        other = join(client)  # a second student, joined while the first is alive
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)
        t0 = time.monotonic()
        wait_for_log(hf_teacher.log_path, f"session {session}: peer gone")
        assert time.monotonic() - t0 < 10  # torn down when the sockets close, not after a long timeout
        seqs = rand_seqs(4)
        (s,) = client.score_query(
            ScoreQuery(seqs[:1], signal="hidden", data_plane_session=other.offer.session),
            fetch_remote=other.fetch_async,
        )
        assert s.hidden.shape == (39, 64)
        other.close()
    finally:
        if peer.poll() is None:
            peer.kill()


def test_the_output_layer_is_the_models_own(client, reference):
    info = client.info()
    weight, bias = client.output_layer(chunk_bytes=4096)  # small chunks: many messages
    assert torch.equal(weight, reference.model.get_output_embeddings().weight.detach())
    assert bias is None and info.output_layer.dtype == "float32" and info.output_layer.has_bias is False
    from student_trainer.teacher_head import check_output_layer

    assert check_output_layer(weight, bias, info) == info.output_layer
