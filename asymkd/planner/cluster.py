"""What the cost model is evaluated on: the cluster (achievable rates), the workload, and link costs.

    cluster, workload = build_inputs(cfg)            # from a PlanConfig (datasheet or calibrated numbers)
    cluster.link("intra").allreduce(8, 64e6)         # seconds of a ring all-reduce of 64 MB over 8 GPUs

Rates here are what is reached, not the datasheet's: FLOP/s = peak × mfu (the served teacher: × teacher_mfu),
bandwidth = link × efficiency.
"""

from __future__ import annotations

from dataclasses import dataclass

from asymkd.planner.config import PlanConfig
from asymkd.planner.presets import GPU_PRESETS, GpuSpec, ModelShape, resolve_model, with_overrides

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A link class (NVLink inside a node, the NIC between nodes): bandwidth per GPU and step latency."""

    bytes_per_s: float
    latency_s: float

    def send(self, nbytes: float) -> float:
        """One point-to-point message (a pipeline hop)."""
        return nbytes / self.bytes_per_s + self.latency_s

    def allreduce(self, n: int, nbytes: float) -> float:
        """Ring all-reduce of `nbytes` over n GPUs: 2(n−1)/n of the data crosses each link, 2(n−1) steps."""
        if n <= 1:
            return 0.0
        return 2 * (n - 1) / n * nbytes / self.bytes_per_s + 2 * (n - 1) * self.latency_s

    def allgather(self, n: int, nbytes: float) -> float:
        """Ring all-gather (or reduce-scatter) whose full result is `nbytes`: (n−1)/n of it, n−1 steps."""
        if n <= 1:
            return 0.0
        return (n - 1) / n * nbytes / self.bytes_per_s + (n - 1) * self.latency_s


@dataclass(frozen=True)
class Cluster:
    """nodes × gpus_per_node GPUs with the rates the cost model uses (achievable, not peak)."""

    nodes: int
    gpus_per_node: int
    mem_bytes: float
    reserve_bytes: float
    flops: float
    teacher_flops: float
    hbm_bytes_per_s: float
    intra: Link
    inter: Link
    grpc_bytes_per_s: float
    name: str = ""
    overlap_comm: bool = True
    """collectives run beside compute (GPU copy engines); False on CPU cores, which do the copies"""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return self.mem_bytes - self.reserve_bytes

    def link(self, spans_nodes: bool) -> Link:
        return self.inter if spans_nodes else self.intra

    def describe(self) -> str:
        return (
            f"{self.nodes} × {self.gpus_per_node} {self.name} ({self.mem_bytes / GB:.0f} GB, "
            f"{self.flops / 1e12:.3g} TFLOP/s reached, {self.intra.bytes_per_s / GB:.3g} GB/s in a node, "
            f"{self.inter.bytes_per_s / GB:.3g} GB/s between nodes)"
        )


@dataclass(frozen=True)
class Workload:
    """One optimizer step: global_batch sequences of seq_len tokens; requests are student micro-batches."""

    global_batch: int
    seq_len: int
    micro_batch: int
    dtype_bytes: int
    signal: str
    top_k: int
    on_policy: float
    gen_tokens: int
    prefetch: int
    transport: str

    @property
    def tokens_per_request(self) -> int:
        return self.micro_batch * self.seq_len

    def payload_bytes_per_token(self, teacher: ModelShape) -> float:
        """Teacher -> student bytes per scored token (one row) for the signal, as the wire codec sends it
        (ids int32, values fp32; HIDDEN in the model dtype); the request (int32 ids) travels the other way
        on the same full-duplex links, so the larger direction counts."""
        k = self.top_k
        answer = {
            "top_k": 8 * k + 8,  # ids + logprobs + tail_logprob + target_logprob
            "target_only": 4,
            "at_ids": 4 * k,
            "sampled": 5 * k,  # ids + counts
            "full": 4 * teacher.vocab,
            "hidden": teacher.hidden * self.dtype_bytes,
        }[self.signal]
        request = 4 + (4 * k if self.signal == "at_ids" else 0)
        return float(max(answer, request))


def build_inputs(cfg: PlanConfig, measured: GpuSpec | None = None) -> tuple[Cluster, Workload]:
    """The Cluster (preset < explicit keys; `measured` replaces the preset when calibrating) and Workload."""
    base = measured or GPU_PRESETS[cfg.gpu]
    gpu = with_overrides(
        base,
        mem_gb=cfg.gpu_mem_gb, peak_tflops=cfg.peak_tflops, hbm_gbps=cfg.hbm_gbps, intra_gbps=cfg.intra_gbps,
        inter_gbps=cfg.inter_gbps, intra_latency_us=cfg.intra_latency_us,
        inter_latency_us=cfg.inter_latency_us, gpus_per_node=cfg.gpus_per_node,
    )  # fmt: skip
    eff = cfg.network_efficiency
    cluster = Cluster(
        nodes=cfg.nodes,
        gpus_per_node=gpu.gpus_per_node,
        mem_bytes=gpu.mem_gb * GB,
        reserve_bytes=cfg.reserve_gb * GB,
        flops=gpu.peak_tflops * 1e12 * cfg.mfu,
        teacher_flops=gpu.peak_tflops * 1e12 * (cfg.teacher_mfu if cfg.teacher_mfu is not None else cfg.mfu),
        hbm_bytes_per_s=gpu.hbm_gbps * GB,
        intra=Link(gpu.intra_gbps * GB * eff, gpu.intra_latency_us * 1e-6),
        inter=Link(gpu.inter_gbps * GB * eff, gpu.inter_latency_us * 1e-6),
        grpc_bytes_per_s=cfg.grpc_gbps * GB,
        name=gpu.name,
        overlap_comm=gpu.overlap_comm,
    )
    workload = Workload(
        global_batch=cfg.global_batch, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch,
        dtype_bytes=2 if cfg.dtype == "bfloat16" else 4, signal=cfg.signal, top_k=cfg.top_k,
        on_policy=cfg.on_policy, gen_tokens=cfg.gen_tokens, prefetch=cfg.prefetch, transport=cfg.transport,
    )  # fmt: skip
    return cluster, workload


def build_models(cfg: PlanConfig) -> tuple[ModelShape, ModelShape]:
    teacher, student = resolve_model(cfg.teacher), resolve_model(cfg.student)
    if teacher.name == "custom":
        teacher = ModelShape(**{**teacher.__dict__, "name": "teacher"})
    if student.name == "custom":
        student = ModelShape(**{**student.__dict__, "name": "student"})
    return teacher, student
