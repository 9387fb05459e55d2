"""`asymkd serve` configuration: one dataclass, from YAML (`--config`) and flags (`--max-wait-ms 5`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class VLLMOptions:
    """Passed through to vLLM's engine arguments (`--vllm.enforce-eager`, ...)."""

    gpu_memory_utilization: float = 0.9  # on the CPU build: the fraction of RAM for the KV cache
    enforce_eager: bool = False
    cpu_offload_gb: float = 0.0  # asymmetric placement: spill teacher weights to host memory
    quantization: str | None = None
    distributed_executor_backend: str | None = None  # "mp" | "ray" | "external_launcher"
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # multi-node: nodes, this node's rank, the head node's address (tensor/pipeline parallel across nodes)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    extra_engine_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")


@dataclass
class ServeConfig:
    model: str = "default"  # an HF folder, a .gguf file, or "default" (the embedded SmolLM2-135M-Instruct)
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"  # hf backend: "cpu", "cuda", "cuda:1"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (printed at start)
    metrics_port: int | None = None  # Prometheus /metrics on this HTTP port; None = off, 0 = any free port
    max_batch_tokens: int = 8192  # micro-batch token budget (sum of sequence lengths)
    max_request_tokens: int = 65536  # larger requests get RESOURCE_EXHAUSTED
    max_wait_ms: float = 5.0  # how long the batcher waits to fill a batch
    max_queue_requests: int = 256  # bounded queue; beyond it RESOURCE_EXHAUSTED at once
    max_seq_len: int = 0  # 0 = the model's max_position_embeddings
    max_top_k: int = 256
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC send/receive limit; larger responses are refused
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    seed: int = 0
    warmup: bool = True
    drain_timeout_s: float = 30.0  # SIGTERM: finish in-flight requests for at most this long
    log_level: str = "INFO"
    vllm: VLLMOptions = field(default_factory=VLLMOptions)

    def __post_init__(self):
        checks = {
            "port": self.port >= 0,
            "max_batch_tokens": self.max_batch_tokens > 0,
            "max_request_tokens": self.max_request_tokens > 0,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_queue_requests": self.max_queue_requests > 0,
            "max_seq_len": self.max_seq_len >= 0,
            "max_top_k": self.max_top_k > 0,
            "max_message_bytes": self.max_message_bytes >= 1024 * 1024,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "pipeline_parallel_size": self.pipeline_parallel_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))
        if self.backend == "hf" and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError(
                "the hf backend runs on one device: tensor_parallel_size/pipeline_parallel_size > 1 need --backend vllm"
            )
