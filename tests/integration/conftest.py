"""Integration fixtures: real teacher servers on free loopback ports."""

from __future__ import annotations

import pytest
import torch

from teacher_server.launch import LocalTeacher, free_port

# The contract suite (test_contract.py) runs once per entry: adding a backend is one line here, e.g.
#   pytest.param(["--backend", "vllm", "--vllm.gpu-memory-utilization", "0.15"], id="vllm", marks=pytest.mark.vllm),
CONTRACT_BACKENDS = [
    pytest.param(["--backend", "hf"], id="hf"),
    pytest.param(
        [
            "--backend",
            "vllm",
            "--vllm.runner",
            "both",
            "--vllm.kv-cache-memory-bytes",
            "67108864",
            "--vllm.enforce-eager",
        ],
        id="vllm",
        marks=pytest.mark.vllm,  # skipped without vLLM (tests/conftest.py)
    ),
]
# Options every contract server gets: full-vocab top-k allowed; small stream chunks so that splitting shows.
CONTRACT_SERVE_ARGS = ["--max-top-k", "512", "--stream-chunk-bytes", "65536"]


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir):
    """In-process transformers forward of the tiny teacher: ids -> (L-1, V) log-softmax rows at temperature T
    (float64 unless `dtype` says otherwise); `reference.model` is the model itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()

    def logprobs(
        ids: list[int], temperature: float = 1.0, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)

    logprobs.model = model
    return logprobs


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher_dir, tmp_path_factory):
    """A real `teacher_server.server` process (hf backend, fp32, CPU) serving the tiny teacher."""
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    with LocalTeacher(
        ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "512"], log_path=log
    ) as t:
        yield t


@pytest.fixture(scope="module", params=CONTRACT_BACKENDS)
def contract_teacher(request, tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher behind a real server, once per backend of CONTRACT_BACKENDS; metrics on."""
    backend = request.param[request.param.index("--backend") + 1]
    log = tmp_path_factory.mktemp("logs") / f"teacher-{backend}.log"
    metrics_port = free_port()
    args = ["--model", str(tiny_teacher_dir), *request.param, *CONTRACT_SERVE_ARGS]
    with LocalTeacher([*args, "--metrics-port", str(metrics_port)], log_path=log) as t:
        t.metrics_port = metrics_port
        yield t


@pytest.fixture(scope="module")
def limited_teacher(tiny_teacher_dir, tmp_path_factory):
    """hf server with tight limits: 1-request queue held 200 ms, 1 MiB messages, 4k-token requests."""
    log = tmp_path_factory.mktemp("logs") / "teacher-limited.log"
    args = ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "512"]
    args += ["--max-queue-requests", "1", "--max-wait-ms", "200", "--max-message-bytes", "1048576"]
    args += ["--max-request-tokens", "4096"]
    with LocalTeacher(args, log_path=log) as t:
        yield t


@pytest.fixture(scope="module")
def one_thread_teacher(tiny_teacher_dir, tmp_path_factory):
    """A real hf server of the tiny teacher with one torch thread, like the test process (same kernels, same
    reduction order, so its answers match an in-process forward bit for bit), max_top_k 64."""
    log = tmp_path_factory.mktemp("logs") / "teacher.log"
    args = ["--model", str(tiny_teacher_dir), "--backend", "hf", "--max-top-k", "64"]
    with LocalTeacher(args, log_path=log, env={"OMP_NUM_THREADS": "1"}) as t:
        yield t
