"""`asymkd plan` configuration: one flat dataclass (`PlanConfig`), loaded by `asymkd.config.run_command`.

    asymkd plan --teacher llama3-70b --student llama3-8b --nodes 8 --gpus-per-node 8 --gpu h100 \
        --seq-len 4096 --global-batch 256 --json

Keys are flat (`--nodes 8`, not `--cluster.nodes 8`): a plan is asked for on one line. Cluster numbers left
unset come from the `--gpu` preset's datasheet (or from `--calibrate`'s measurements).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asymkd.planner.presets import resolve_model

Signal = Literal["top_k", "target_only", "at_ids", "sampled", "full", "hidden"]


@dataclass
class PlanConfig:
    """Partition planner: teacher replicas × TP × PP and student FSDP/HSDP sizes over the cluster's GPUs."""

    teacher: str = ""
    """teacher model: a preset (llama3-70b, llama3-8b, llama3.2-1b, llama3.1-405b, qwen3-32b, qwen3-8b,
    qwen3-1.7b, qwen3-0.6b), an HF folder with config.json, or sizes
    layers=80,hidden=8192,intermediate=28672,heads=64,kv_heads=8,vocab=128256[,head_dim=128,tied=true]"""
    student: str = ""
    """student model, as for teacher"""
    nodes: int = 1
    """nodes in the cluster"""
    gpus_per_node: int | None = None
    """GPUs per node; default: the gpu preset's (8)"""
    gpu: Literal["h100", "h200", "a100"] = "h100"
    """GPU node preset (datasheet numbers; the keys below override them)"""
    gpu_mem_gb: float | None = None
    """memory per GPU (GB); default: the preset's"""
    peak_tflops: float | None = None
    """dense peak per GPU (TFLOP/s) in the compute dtype; default: the preset's BF16 figure"""
    hbm_gbps: float | None = None
    """GPU memory bandwidth (GB/s): weight reads when the student generates"""
    intra_gbps: float | None = None
    """intra-node bandwidth per GPU, one direction (GB/s; NVLink)"""
    inter_gbps: float | None = None
    """inter-node bandwidth per GPU, one direction (GB/s; its NIC)"""
    intra_latency_us: float | None = None
    """latency of one intra-node message step (µs)"""
    inter_latency_us: float | None = None
    """latency of one inter-node message step (µs)"""
    mfu: float = 0.4
    """fraction of peak FLOP/s a training step reaches (the student; the symmetric layout's teacher forward,
    which runs inside the training framework)"""
    teacher_mfu: float | None = 0.5
    """fraction of peak FLOP/s the served teacher's forward reaches (vLLM prefill); null = mfu"""
    network_efficiency: float = 0.8
    """fraction of the link bandwidth collectives and transfers reach"""
    reserve_gb: float = 2.0
    """memory per GPU kept for the framework (CUDA context, workspaces, fragmentation)"""
    global_batch: int = 256
    """sequences per optimizer step"""
    seq_len: int = 4096
    """tokens per sequence"""
    micro_batch: int = 1
    """sequences per student micro-batch (= per teacher request)"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """weights/activations dtype of both models (optimizer states are fp32 either way)"""
    signal: Signal = "top_k"
    """teacher signal sent to the student (sets the payload per token)"""
    top_k: int = 64
    """k of top_k (also the ids of at_ids and the draws of sampled)"""
    on_policy: float = 0.0
    """fraction of samples the student generates itself before scoring (GKD's lambda)"""
    gen_tokens: int = 0
    """tokens the student generates per on-policy sample"""
    prefetch: int = 4
    """teacher.prefetch: micro-batches each student rank keeps in flight to the teacher"""
    transport: Literal["grpc", "torch"] = "grpc"
    """teacher -> student data plane: grpc, or torch (NCCL/gloo) for the tensors"""
    grpc_gbps: float = 1.0
    """throughput of one gRPC stream (GB/s; protobuf + Python bound, ~0.6 GB/s measured on loopback)"""
    json: bool = False
    """print the plan as one JSON object"""
    markdown: bool = False
    """print the plan as a markdown table row (docs/planner.md's tables are made this way)"""
    markdown_header: bool = False
    """with --markdown: print the table's header first"""
    top: int = 5
    """plans listed in the text output"""
    calibrate: bool = False
    """measure this machine (matmul FLOP/s, memcpy, a loopback gloo pair) instead of the datasheet"""
    calibrate_s: float = 8.0
    """time budget of --calibrate, seconds"""
    emit: Literal["", "slurm", "k8s"] = ""
    """write the launch files of the best plan: `--emit slurm DIR` or `--emit k8s DIR`"""
    emit_dir: str = ""
    """folder --emit writes to (`--emit slurm DIR` sets it)"""

    def __post_init__(self) -> None:
        for key in ("teacher", "student"):
            value = getattr(self, key)
            if not value:
                raise ValueError(f"{key}: a model is needed (a preset, an HF folder, or sizes)")
            try:
                resolve_model(value)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        positive = {
            "nodes": self.nodes, "global_batch": self.global_batch, "seq_len": self.seq_len,
            "micro_batch": self.micro_batch, "top_k": self.top_k, "prefetch": self.prefetch, "top": self.top,
        }  # fmt: skip
        if self.gpus_per_node is not None:
            positive["gpus_per_node"] = self.gpus_per_node
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        self._check_rates()
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy: must be in [0, 1], got {self.on_policy}")
        if self.gen_tokens < 0 or (self.on_policy > 0 and self.gen_tokens == 0):
            raise ValueError(f"gen_tokens: must be >= 1 when on_policy > 0, got {self.gen_tokens}")
        if bool(self.emit) != bool(self.emit_dir):
            raise ValueError(f"emit: `--emit slurm|k8s DIR` takes a kind and a folder, got {self.emit!r}")
        if self.json and self.markdown:
            raise ValueError("json: --json and --markdown are exclusive")

    def _check_rates(self) -> None:
        for key in ("mfu", "teacher_mfu", "network_efficiency"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{key}: must be in (0, 1], got {value}")
        for key in ("gpu_mem_gb", "peak_tflops", "hbm_gbps", "intra_gbps", "inter_gbps", "grpc_gbps"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be > 0, got {value}")
        for key in ("intra_latency_us", "inter_latency_us", "reserve_gb", "calibrate_s"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ValueError(f"{key}: must be >= 0, got {value}")
