"""TLS, mutual TLS and bearer-token auth against real servers on loopback, with certificates made here.

Refusals: a TLS handshake that fails (a plaintext client, a client that does not trust the server's CA, a
client without a certificate the server requires) never opens an HTTP/2 stream that could carry a status,
so gRPC reports it on the client as UNAVAILABLE (a transport failure; the server cannot answer
UNAUTHENTICATED there). A call that gets through TLS without the right token is answered UNAUTHENTICATED by
the server. Health and reflection answer without a token. The right client trains end to end.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from asymkd.contract import tokenizer_hash
from student_trainer.config import DistillSection, TeacherSection, client_options
from student_trainer.sources.base import StudentSide
from student_trainer.sources.live import TeacherFeed
from teacher_server.client import AsyncTeacherClient, TeacherClient, TeacherError
from teacher_server.launch import LocalTeacher
from teacher_server.security import BAD_TOKEN, NO_TOKEN, ClientSecurity

TOKEN = "s3cret-token-0123456789"
SERVER_NAME = "teacher.internal"  # the only name on the TLS server's certificate (tls_server_name)


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        d,
        "req",
        "-x509",
        *key,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )


def make_cert(d: Path, name: str, ca: str, san: str = "") -> None:
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(d, "req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    sign = ["-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2"]
    openssl(d, "x509", "-req", "-in", f"{name}.csr", *sign, "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca (signs everything below), other_ca (trusted by nobody); server: 127.0.0.1; named: teacher.internal."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other_ca")
    make_cert(d, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "named", "ca", f"DNS:{SERVER_NAME}")
    make_cert(d, "client", "ca")
    make_cert(d, "stranger", "other_ca")
    (d / "token").write_text(TOKEN + "\n")
    (d / "wrong_token").write_text("not-the-token\n")
    return d


def start(model_dir, pki: Path, log: Path, *serve_args: str, **tls) -> LocalTeacher:
    args = ["--model", str(model_dir), "--backend", "hf", "--max-wait-ms", "1", *serve_args]
    return LocalTeacher(args, log_path=log, start_timeout_s=120, **tls).start()


@pytest.fixture(scope="module")
def mtls_teacher(tiny_teacher_dir, pki, tmp_path_factory):
    """TLS + client certificates required + token."""
    p = pki
    args = ["--tls-cert", p / "server.pem", "--tls-key", p / "server.key", "--tls-client-ca", p / "ca.pem"]
    args += ["--auth-token-file", p / "token"]
    log = tmp_path_factory.mktemp("logs") / "mtls.log"
    tls = {"tls_ca": p / "ca.pem", "tls_cert": p / "client.pem", "tls_key": p / "client.key"}
    teacher = start(tiny_teacher_dir, pki, log, *map(str, args), **tls)
    yield teacher
    teacher.stop()


@pytest.fixture(scope="module")
def tls_teacher(tiny_teacher_dir, pki, tmp_path_factory):
    """TLS (a certificate for teacher.internal only) + token; no client certificate needed."""
    args = [
        "--tls-cert",
        pki / "named.pem",
        "--tls-key",
        pki / "named.key",
        "--auth-token-file",
        pki / "token",
    ]
    log = tmp_path_factory.mktemp("logs") / "tls.log"
    teacher = start(
        tiny_teacher_dir, pki, log, *map(str, args), tls_ca=pki / "ca.pem", tls_server_name=SERVER_NAME
    )
    yield teacher
    teacher.stop()


def client(address: str, **options) -> TeacherClient:
    return TeacherClient([address], timeout_s=20, max_retries=0, **options)


def refusal(address: str, **options) -> TeacherError:
    with client(address, **options) as c, pytest.raises(TeacherError) as e:
        c.info()
    return e.value


def mtls_options(pki: Path, **changes) -> dict:
    base = {
        "tls_ca": pki / "ca.pem",
        "tls_cert": pki / "client.pem",
        "tls_key": pki / "client.key",
        "auth_token_file": pki / "token",
    }
    return {k: v for k, v in {**base, **changes}.items() if v is not None}


# ---- refusals ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes",
    [
        {"tls_ca": None, "tls_cert": None, "tls_key": None, "auth_token_file": None},  # plaintext
        {"tls_ca": "other_ca.pem"},  # does not trust the server's CA
        {"tls_cert": None, "tls_key": None},  # mTLS: no client certificate
        {"tls_cert": "stranger.pem", "tls_key": "stranger.key"},  # a certificate of another CA
    ],
    ids=["plaintext", "without-the-ca", "without-a-client-cert", "cert-of-another-ca"],
)
def test_failed_tls_handshakes_are_unavailable(mtls_teacher, pki, changes):
    changes = {k: v if v is None else pki / v for k, v in changes.items()}
    err = refusal(mtls_teacher.address, **mtls_options(pki, **changes))
    assert err.code == grpc.StatusCode.UNAVAILABLE, err


@pytest.mark.parametrize(("token", "message"), [(None, NO_TOKEN), ("wrong_token", BAD_TOKEN)])
def test_a_missing_or_wrong_token_is_unauthenticated_on_every_rpc(mtls_teacher, pki, token, message):
    options = mtls_options(pki, auth_token_file=pki / token if token else None)
    with client(mtls_teacher.address, **options) as c:
        calls = {
            "GetInfo": c.info,
            "Score": lambda: c.score([[1, 2, 3]], top_k=4),
            "ScoreStream": lambda: list(c.score_stream([[[1, 2, 3]]], top_k=4)),
            "Generate": lambda: c.generate([[1, 2]], max_new_tokens=2),
        }
        for name, call in calls.items():
            with pytest.raises(TeacherError) as e:
                call()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, (name, e.value)
            assert e.value.details == message
            assert TOKEN not in e.value.details and "not-the-token" not in e.value.details


def test_a_refused_score_stream_reports_the_refusal_every_time(mtls_teacher, pki):
    """The client writes a stream's requests only once the server has accepted the call: a write racing the
    refusal would make grpc.aio report INTERNAL instead of it (https://github.com/grpc/grpc/issues/36066)."""
    with client(mtls_teacher.address, **mtls_options(pki, auth_token_file=None)) as c:
        for attempt in range(40):
            queries = [[[1, 2, 3]], [[4, 5, 6, 7]], [[8, 9]]]
            with pytest.raises(TeacherError) as e:
                list(c.score_stream(queries, top_k=4, max_in_flight=3))
            assert (e.value.code, e.value.details) == (grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN), attempt


def test_the_slurm_wait_checks_a_tls_teacher_with_the_train_configs_keys(mtls_teacher, pki, tmp_path):
    """`asymkd.hetjob wait` (and the hetjob's student and teacher steps) check health over TLS with the
    teacher section's certificates: a plaintext check of a TLS teacher would never see SERVING."""
    from asymkd import hetjob

    teacher = {"targets": [mtls_teacher.address]} | {k: str(v) for k, v in mtls_options(pki).items()}
    train = {"model": {"tokenizer": "tok"}, "data": {"builtin": "stdlib-docs"}, "teacher": teacher}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(train))
    assert hetjob.run_wait(str(path), 30, poll_s=0.1) == 0
    del teacher["tls_ca"], teacher["tls_cert"], teacher["tls_key"]
    teacher["auth_token_file"] = str(pki / "token")
    path.write_text(yaml.safe_dump(train | {"teacher": teacher}))
    assert hetjob.run_wait(str(path), 1.0, poll_s=0.1) == 1  # plaintext: the handshake fails


def test_health_and_reflection_answer_without_a_token(mtls_teacher, pki):
    security = ClientSecurity.build(
        tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key"
    )
    with security.channel(mtls_teacher.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "asymkd.v1.Teacher"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = refl.ServerReflectionInfo(iter([request]), timeout=20)
        assert "asymkd.v1.Teacher" in {s.name for s in reply.list_services_response.service}


def test_the_right_client_gets_every_rpc_answered(mtls_teacher, pki):
    with client(mtls_teacher.address, **mtls_options(pki)) as c:
        assert c.info().vocab_size == 512
        (scores,) = c.score([[1, 2, 3, 4]], top_k=4)
        assert scores.ids.shape == (3, 4)
        streamed = [r[0].ids for r in c.score_stream([[[1, 2, 3, 4]]] * 3, top_k=4)]
        assert all(torch.equal(s, scores.ids) for s in streamed)
        assert len(c.generate([[1, 2]], max_new_tokens=2, n=2)[0]) == 2
    log = mtls_teacher.log_path.read_text()
    assert "TLS, client certificates required, bearer token required" in log and TOKEN not in log


def test_a_certificate_for_another_name_needs_tls_server_name(tls_teacher, pki):
    options = {"tls_ca": pki / "ca.pem", "auth_token_file": pki / "token"}
    assert refusal(tls_teacher.address, **options).code == grpc.StatusCode.UNAVAILABLE  # name mismatch
    with client(tls_teacher.address, tls_server_name=SERVER_NAME, **options) as c:
        assert c.info().vocab_size == 512


def test_a_token_on_loopback_without_tls_warns_once_and_works(
    tiny_teacher_dir, pki, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TEACHER_TOKEN", TOKEN)
    teacher = start(tiny_teacher_dir, pki, tmp_path / "plain.log", "--auth-token-file", str(pki / "token"))
    try:
        with (
            caplog.at_level(logging.WARNING, logger="asymkd.security"),
            client(teacher.address, auth_token_env="TEACHER_TOKEN") as c,
        ):
            assert c.info().vocab_size == 512 and c.score([[1, 2, 3]], top_k=2)[0].ids.shape == (2, 2)
        warnings = [r.getMessage() for r in caplog.records if "plaintext" in r.getMessage()]
        assert len(warnings) == 1 and TOKEN not in warnings[0]
        assert refusal(teacher.address).code == grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv("TEACHER_TOKEN", "nope")
        assert (
            refusal(teacher.address, auth_token_env="TEACHER_TOKEN").code == grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        teacher.stop()


# ---- configuration -----------------------------------------------------------------------------------
def serve_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "asymkd.cli", "serve", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--tls-cert", "server.pem"], "tls_cert needs tls_key"),
        (["--tls-client-ca", "ca.pem"], "tls_client_ca (mutual TLS) needs tls_cert"),
        (["--tls-cert", "server.pem", "--tls-key", "nope.key"], "tls_key='{d}/nope.key': no such file"),
        (["--auth-token-file", "nope"], "auth_token_file='{d}/nope': no such file"),
    ],
)
def test_serve_refuses_bad_security_options_naming_the_key(pki, args, text):
    args = [a if a.startswith("--") else str(pki / a) for a in args]
    res = serve_cli("--model", "default", *args)
    assert res.returncode == 2 and text.format(d=pki) in res.stderr and "Traceback" not in res.stderr


def test_teacher_section_checks_and_client_options(pki, monkeypatch):
    with pytest.raises(ValueError, match="tls_cert needs tls_key"):
        TeacherSection(tls_cert=str(pki / "client.pem"))
    with pytest.raises(ValueError, match=re.escape("tls_ca='/nonexistent/ca.pem': no such file")):
        TeacherSection(tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="auth_token_env='ASYMKD_NO_SUCH_VAR'"):
        TeacherSection(auth_token_env="ASYMKD_NO_SUCH_VAR")
    with pytest.raises(ValueError, match="not both"):
        TeacherSection(auth_token_file=str(pki / "token"), auth_token_env="HOME")
    section = TeacherSection(tls_ca=str(pki / "ca.pem"), auth_token_file=str(pki / "token"), timeout_s=7)
    assert client_options(section) == {
        "timeout_s": 7,
        "max_retries": section.max_retries,
        "tls_ca": str(pki / "ca.pem"),
        "auth_token_file": str(pki / "token"),
    }
    assert client_options(TeacherSection()) == {"timeout_s": 60.0, "max_retries": 5}


# ---- the student over TLS + token ------------------------------------------------------------------------
def secured_section(teacher: LocalTeacher, pki: Path, **changes) -> TeacherSection:
    values = {
        "targets": [teacher.address],
        "tls_ca": str(pki / "ca.pem"),
        "tls_server_name": SERVER_NAME,
        "auth_token_file": str(pki / "token"),
        "connect_timeout_s": 30.0,
        "retry_deadline_s": 30.0,
    }
    return TeacherSection(**{**values, **changes})


def test_the_teacher_feed_scores_over_tls_and_token(tls_teacher, pki, tiny_teacher_dir):
    section = secured_section(tls_teacher, pki)
    batches = [
        {
            "input_ids": torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(i)),
            "loss_mask": torch.ones(2, 15, dtype=torch.bool),
            "sample_ids": torch.arange(2) + 2 * i,
        }
        for i in range(3)
    ]
    student = StudentSide(vocab_size=512, tokenizer_hash=tokenizer_hash(tiny_teacher_dir), seq_len=16)
    feed = TeacherFeed(
        batches,
        section,
        DistillSection(top_k=8),
        student,
        client_factory=functools.partial(AsyncTeacherClient, **client_options(section)),
    )
    try:
        fed = list(feed)
    finally:
        feed.close()
    assert [f.index for f in fed] == [0, 1, 2]
    assert all(f.teacher.valid.all() and f.teacher.ids.shape == (2, 15, 8) for f in fed)


def test_a_student_trains_over_tls_and_token(tls_teacher, pki, tiny_student_dir, tmp_path, monkeypatch):
    """Needs student_trainer/sources/live.py to build its client with `**client_options(teacher)`."""
    from asymkd.cli import train

    monkeypatch.setenv("ASYMKD_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"the cat {i} runs over the small red house by the river" for i in range(40))
    )
    out = tmp_path / "run"
    argv = ["--model.path", str(tiny_student_dir), "--data.paths", f"[{corpus}]", "--data.seq_len", "32"]
    argv += ["--optim.micro_batch_size", "2", "--run.steps", "2", "--run.out_dir", str(out)]
    argv += ["--checkpoint.export", "false", "--distill.top_k", "8"]
    argv += ["--teacher.targets", f"[{tls_teacher.address}]", "--teacher.tls-ca", str(pki / "ca.pem")]
    argv += ["--teacher.tls-server-name", SERVER_NAME, "--teacher.auth-token-file", str(pki / "token")]
    argv += ["--teacher.connect-timeout-s", "30", "--teacher.retry-deadline-s", "30"]
    assert train(argv) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    assert [s["step"] for s in steps] == [1, 2] and all(s["kd"] > 0 for s in steps)
