"""`asymkd serve` configuration: one dataclass, from YAML (`--config`) and flags (`--max-wait-ms 5`).

Each field's docstring is its `asymkd serve --help` text (asymkd/config.py loads and documents it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class VLLMOptions:
    """Passed through to vLLM's engine arguments (`--vllm.enforce-eager`, ...); see backends/vllm.py.

    `runner` picks what the vLLM engine computes (one engine runs one runner):
      pooling  - final hidden states + the teacher's output layer in torch: every Score signal, exact at
                 any temperature (TOP_K tail included); Generate answers UNIMPLEMENTED.
      generate - prompt logprobs (TOP_K / TARGET_ONLY at temperature 1 only; the tail is derived from the
                 top-k) + Generate.
      both     - one engine of each in the process (Score on pooling, Generate on generate): all of the
                 above, at twice the weight memory; gpu_memory_utilization / kv_cache_memory_bytes are
                 split evenly between the two.
    """

    runner: Literal["pooling", "generate", "both"] = "pooling"
    """what the engine computes: pooling (every Score signal), generate (prompt logprobs + Generate), both"""
    gpu_memory_utilization: float | None = None
    """GPUs: the fraction of GPU memory vLLM may use (None = 0.9). The CPU build reads it as the fraction of
    RAM that must hold the worker's own memory AND the KV cache (0.9 never fits): there None means a fixed KV
    cache of kv_cache_memory_bytes (default 1 GiB) instead."""
    kv_cache_memory_bytes: int | None = None
    """a fixed KV cache size; overrides gpu_memory_utilization"""
    enforce_eager: bool = False
    """vLLM: run eagerly, no CUDA graphs (faster start, slower steps)"""
    cpu_offload_gb: float = 0.0
    """asymmetric placement: spill teacher weights to host memory"""
    quantization: str | None = None
    """vLLM quantization method (e.g. fp8, awq); None = vLLM's default"""
    distributed_executor_backend: str | None = None
    """"mp" | "ray" | "external_launcher"; None = vLLM's choice"""
    max_num_seqs: int | None = None
    """sequences per engine step; None = vLLM's default"""
    max_num_batched_tokens: int | None = None
    """tokens per engine step; None = vLLM's default"""
    nnodes: int = 1
    """multi-node (tensor/pipeline parallel across nodes): the number of nodes"""
    node_rank: int = 0
    """multi-node: this node's rank"""
    master_addr: str | None = None
    """multi-node: the head node's address"""
    master_port: int | None = None
    """multi-node: the head node's port"""
    head_device: str = "auto"
    """pooling runner: where the output layer runs ("auto" = cuda if available, else cpu)"""
    extra_engine_args: dict[str, Any] = field(default_factory=dict)
    """any other AsyncEngineArgs field, verbatim (`--vllm.extra-engine-args '{swap_space: 4}'`)"""

    def __post_init__(self):
        util = self.gpu_memory_utilization
        if util is not None and not 0.0 < util <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.cpu_offload_gb < 0:
            raise ValueError(f"cpu_offload_gb must be >= 0, got {self.cpu_offload_gb}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank must be in [0, nnodes), got node_rank={self.node_rank} nnodes={self.nnodes}"
            )


@dataclass
class ServeConfig:
    """Run the asymkd teacher gRPC service (Teacher + health + reflection, Prometheus metrics)."""

    model: str = "default"
    """an HF folder, a .gguf file, or "default" (the embedded SmolLM2-135M-Instruct)"""
    backend: Literal["hf", "vllm"] = "hf"
    """the engine: HF transformers (one device) or vLLM (tensor/pipeline parallel)"""
    device: str = "cpu"
    """hf backend: "cpu", "cuda", "cuda:1\""""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the teacher's weights and compute dtype"""
    host: str = "127.0.0.1"
    """the address to listen on"""
    port: int = 50051
    """0 = any free port (printed at start)"""
    metrics_port: int | None = None
    """Prometheus /metrics on this HTTP port; None = off, 0 = any free port"""
    omp_wait_policy: Literal["passive", "active", ""] = "passive"
    """how the engine's idle OpenMP threads wait between parallel regions (set before torch loads): passive
    sleeps, so a student on the same cores gets them (bench/omp_wait_ab.py, 2 shared cores: top-64 KD 1.81 ->
    2.08 samples/s, HIDDEN over gRPC 1.22 -> 1.82); active spins (no gain measured on dedicated cores); "" =
    OpenMP's default. An OMP_WAIT_POLICY in the environment wins"""
    max_batch_tokens: int = 8192
    """micro-batch token budget (sum of sequence lengths)"""
    max_request_tokens: int = 65536
    """larger requests get RESOURCE_EXHAUSTED"""
    max_wait_ms: float = 5.0
    """how long the batcher waits to fill a batch"""
    max_queue_requests: int = 256
    """bounded queue; beyond it RESOURCE_EXHAUSTED at once"""
    max_seq_len: int = 0
    """0 = the model's max_position_embeddings"""
    max_top_k: int = 256
    """the largest top_k a request may ask for"""
    max_message_bytes: int = 64 * 1024 * 1024
    """gRPC send/receive limit; larger responses are refused"""
    max_queue_tokens: int = 0
    """also bound the queue by tokens waiting; 0 = by requests only"""
    max_inflight_batches: int = 1
    """engine batches running at once (vLLM can overlap several)"""
    max_stream_inflight: int = 64
    """ScoreStream: requests of one stream being worked on at once"""
    stream_chunk_bytes: int = 4 * 1024 * 1024
    """ScoreStream: large results are split into messages of about this size (at most max_message_bytes / 2)"""
    tensor_parallel_size: int = 1
    """vllm backend: GPUs a layer is split over"""
    pipeline_parallel_size: int = 1
    """vllm backend: pipeline stages"""
    seed: int = 0
    """seeds the server-chosen sampling seeds (Generate, SAMPLED) and the engine"""
    warmup: bool = True
    """one tiny score (+ generate) after loading, before health says SERVING"""
    drain_timeout_s: float = 30.0
    """SIGTERM: finish in-flight requests for at most this long"""
    log_level: str = "INFO"
    """DEBUG | INFO | WARNING | ERROR"""
    tls_cert: str = ""
    """TLS: this server's certificate chain (PEM); with tls_key, every gRPC endpoint is served over TLS"""
    tls_key: str = ""
    """TLS: the private key of tls_cert (PEM)"""
    tls_client_ca: str = ""
    """mutual TLS: clients must present a certificate signed by this CA (PEM); needs tls_cert"""
    auth_token_file: str = ""
    """a file holding the bearer token every call must carry (`authorization: Bearer <token>`); health and
    reflection stay open. Without TLS the token travels in plaintext: loopback or private networks only"""
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    """vllm backend: engine options"""

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
            "max_queue_tokens": self.max_queue_tokens >= 0,
            "max_inflight_batches": self.max_inflight_batches >= 1,
            "max_stream_inflight": self.max_stream_inflight >= 1,
            "stream_chunk_bytes": self.stream_chunk_bytes >= 1024,
            "tensor_parallel_size": self.tensor_parallel_size >= 1,
            "pipeline_parallel_size": self.pipeline_parallel_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(", ".join(f"{k}={getattr(self, k)!r} is out of range" for k in bad))
        self._check_security()
        if self.backend == "hf" and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            raise ValueError(
                "the hf backend runs on one device: tensor_parallel_size/pipeline_parallel_size > 1 need --backend vllm"
            )

    def _check_security(self) -> None:
        """TLS files come as a pair and exist; the token file holds one token (read again at start)."""
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ValueError(f"{given} needs {missing} (a certificate and its key go together)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key (the server's own)")
        for key in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ValueError(f"{key}={path!r}: no such file")
        if self.auth_token_file:
            from teacher_server.security import read_token_file  # grpc: only when a token is configured

            read_token_file(self.auth_token_file)
