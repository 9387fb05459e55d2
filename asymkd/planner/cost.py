"""The cost model (docs/planner.md derives and discusses every term): throughput of each side of a plan.

    t = teacher_cost(model, TeacherLayout(replicas=6, tp=4, pp=2), cluster, workload, student_ranks=16)
    s = student_cost(model, StudentLayout(dp_shard=8, dp_replicate=2), cluster, workload, teacher=model_t)
    x = transport_samples_per_s(teacher_model, t.layout, s.layout, cluster, workload)
    sym = symmetric_cost(teacher_model, student_model, cluster, workload)     # TRL's layout

Teacher (prefill only): a request is one student micro-batch of n = micro_batch × seq_len tokens; a replica of
tp × pp GPUs spends per pipeline stage τ = compute/(tp·pp) + 2·(L/pp) TP all-reduces of n·h bytes + one
pipeline hop; with m requests in flight per replica a fraction m/(m+pp−1) of the pipeline is busy.
Student: forward+backward (3× the forward FLOPs, 4× with activation checkpointing), FSDP all-gathers
(forward, backward) and reduce-scatter per micro-batch overlapped with compute, HSDP all-reduce, on-policy
generation (weight reads per decoded token). The asymkd split runs both sides and the transport at once
(throughput = the slowest); the symmetric layout runs teacher then student on every GPU. Communication that
FSDP/ZeRO-3 prefetch can hide overlaps compute on GPUs and adds to it on CPU cores (`Cluster.overlap_comm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from asymkd.planner.cluster import GB, Cluster, Workload
from asymkd.planner.presets import ModelShape

FP32 = 4
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 sharded params + fp32 grads + AdamW m and v


@dataclass(frozen=True)
class TeacherLayout:
    """replicas × (TP × PP); `per_node`: the teacher's GPUs on each of its nodes (0 = the whole node)."""

    replicas: int
    tp: int
    pp: int
    per_node: int = 0

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp * self.pp


@dataclass(frozen=True)
class StudentLayout:
    """FSDP over dp_shard ranks × dp_replicate replicas (HSDP); `per_node` as for TeacherLayout."""

    dp_shard: int
    dp_replicate: int = 1
    per_node: int = 0

    @property
    def gpus(self) -> int:
        return self.dp_shard * self.dp_replicate


@dataclass
class Memory:
    """Bytes per GPU by part; `fits` against the cluster's usable memory."""

    parts: dict[str, float]
    usable: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def describe(self) -> str:
        parts = " + ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GB)
        return f"{self.total / GB:.1f} GB per GPU ({parts}) vs {self.usable / GB:.1f} GB usable"


@dataclass
class TeacherCost:
    layout: TeacherLayout
    samples_per_s: float
    stage_s: float
    compute_s: float
    tp_comm_s: float
    hop_s: float
    in_flight: float
    busy: float
    memory: Memory


@dataclass
class StudentCost:
    layout: StudentLayout
    samples_per_s: float
    step_s: float
    compute_s: float
    comm_s: float
    generate_s: float
    micro_batches: int
    recompute: bool
    memory: Memory


@dataclass
class SymmetricCost:
    """TRL's layout: both models on every GPU, teacher forward then student step, micro-batch by micro-batch."""

    samples_per_s: float
    step_s: float
    teacher_s: float
    student_s: float
    teacher_sharded: bool
    student: StudentLayout
    recompute: bool
    memory: Memory
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ teacher
def pipeline_busy(in_flight: float, pp: int) -> float:
    """Fraction of a pp-stage pipeline kept busy by `in_flight` requests: m/(m+pp−1) (fill and drain once per
    window of m), times min(1, m) when fewer requests than replicas leave some replicas idle."""
    m = max(in_flight, 1e-9)
    return min(1.0, m) * max(m, 1.0) / (max(m, 1.0) + pp - 1)


def teacher_stage_s(
    model: ModelShape, tp: int, pp: int, cl: Cluster, wl: Workload, per_node: int = 0
) -> tuple[float, float, float, float]:
    """(stage time, compute, TP comm, hop) of one request on one pipeline stage of a tp × pp replica; the
    hop crosses nodes when the replica is larger than the teacher's GPUs per node."""
    n = wl.tokens_per_request
    g = tp * pp
    flops = n * model.forward_flops_per_token(wl.seq_len, output_layer=wl.signal != "hidden")
    compute = flops / (g * cl.teacher_flops)
    act = n * model.hidden * wl.dtype_bytes
    tp_comm = 2 * (model.layers / pp) * cl.intra.allreduce(tp, act)  # after attention and after the MLP
    hop = cl.link(g > (per_node or cl.gpus_per_node)).send(act) if pp > 1 else 0.0
    return compute + tp_comm + hop, compute, tp_comm, hop


def teacher_memory(
    model: ModelShape, tp: int, pp: int, in_flight: float, cl: Cluster, wl: Workload
) -> Memory:
    """The heaviest stage's GPU: its weights, the KV of every request in flight, one request's activations."""
    db, n = wl.dtype_bytes, wl.tokens_per_request
    embed = model.embed_params() if pp == 1 else model.vocab * model.hidden  # first/last stage hold one
    weights = (model.layers / pp * model.layer_params() + embed) * db / tp
    kv_per_rank = model.kv_dim / tp if model.kv_heads >= tp else model.hd  # below one KV head: replicated
    kv = math.ceil(max(in_flight, 1.0)) * n * (model.layers / pp) * 2 * kv_per_rank * db
    acts = n * (2 * model.hidden + 3 * model.intermediate / tp) * db + n * model.vocab / tp * FP32
    return Memory({"weights": weights, "kv": kv, "activations": acts}, cl.usable_bytes)


def teacher_cost(
    model: ModelShape, layout: TeacherLayout, cl: Cluster, wl: Workload, *, student_ranks: float
) -> TeacherCost:
    """Samples/s of `layout` when `student_ranks` feeds each keep wl.prefetch requests in flight."""
    stage, compute, tp_comm, hop = teacher_stage_s(model, layout.tp, layout.pp, cl, wl, layout.per_node)
    m = wl.prefetch * student_ranks / layout.replicas
    busy = pipeline_busy(m, layout.pp)
    sps = layout.replicas * busy * wl.micro_batch / stage
    mem = teacher_memory(model, layout.tp, layout.pp, m, cl, wl)
    return TeacherCost(layout, sps, stage, compute, tp_comm, hop, m, busy, mem)


# ------------------------------------------------------------------------------------------------ student
def student_memory(
    model: ModelShape, layout: StudentLayout, recompute: bool, cl: Cluster, wl: Workload
) -> Memory:
    """Sharded fp32 states, gathered blocks and root (embedding/output), activations of one micro-batch."""
    db, n, h = wl.dtype_bytes, wl.tokens_per_request, model.hidden
    states = OPTIMIZER_BYTES_PER_PARAM * model.params() / layout.dp_shard
    gathered = (2 * model.layer_params() + model.embed_params()) * db  # current + prefetched block, the root
    if wl.on_policy > 0:  # generation runs on the whole (gathered) model
        gathered = model.params() * db
    per_layer = 4 * h + 2 * model.attn_dim + 2 * model.kv_dim + 4 * model.intermediate  # saved for backward
    if recompute:
        acts = n * (model.layers * h + per_layer) * db  # block inputs + the block being recomputed
    else:
        acts = n * model.layers * per_layer * db
    logits = n * model.vocab * (db + FP32)  # the logits and their fp32 gradient (the fused KD kernel)
    return Memory(
        {"states": states, "gathered": gathered, "activations": acts, "logits": logits}, cl.usable_bytes
    )


def student_micro_s(
    model: ModelShape, layout: StudentLayout, recompute: bool, cl: Cluster, wl: Workload, extra_flops: float
) -> tuple[float, float, float]:
    """(time, compute, comm) of one micro-batch on one rank; FSDP traffic overlaps compute (`_overlap`)."""
    n, db = wl.tokens_per_request, wl.dtype_bytes
    flops = n * ((4 if recompute else 3) * model.forward_flops_per_token(wl.seq_len) + extra_flops)
    compute = flops / cl.flops
    shard = cl.link(layout.dp_shard > _gpus_per_node(layout, cl))
    p = model.params()
    comm = 2 * shard.allgather(layout.dp_shard, p * db) + shard.allgather(layout.dp_shard, p * FP32)
    replicas = cl.link(layout.gpus > _gpus_per_node(layout, cl))
    comm += replicas.allreduce(layout.dp_replicate, p * FP32 / layout.dp_shard)
    return _overlap(compute, comm, cl), compute, comm


def _overlap(compute: float, comm: float, cl: Cluster) -> float:
    """A GPU moves data with its copy engines while it computes; a CPU core does the copies itself."""
    return max(compute, comm) if cl.overlap_comm else compute + comm


def _gpus_per_node(layout: StudentLayout, cl: Cluster) -> int:
    return min(layout.per_node or cl.gpus_per_node, layout.gpus)


def generate_s(model: ModelShape, layout: StudentLayout, cl: Cluster, wl: Workload) -> float:
    """On-policy rollouts per step on one rank: gather the model once, then per decoded token read all
    weights (memory bound) or compute for the batch (compute bound), whichever is slower."""
    if wl.on_policy == 0:
        return 0.0
    batch = wl.on_policy * math.ceil(wl.global_batch / layout.gpus)
    p, db = model.params(), wl.dtype_bytes
    per_token = max(p * db / cl.hbm_bytes_per_s, 2 * p * batch / cl.flops)
    shard = cl.link(layout.dp_shard > _gpus_per_node(layout, cl))
    return shard.allgather(layout.dp_shard, p * db) + wl.gen_tokens * per_token


def student_cost(
    model: ModelShape, layout: StudentLayout, cl: Cluster, wl: Workload, *, teacher: ModelShape
) -> StudentCost:
    """Samples/s of FSDP/HSDP `layout`; activation checkpointing only when the activations do not fit."""
    extra = 2.0 * teacher.vocab * teacher.hidden if wl.signal == "hidden" else 0.0  # teacher's output layer
    micro = math.ceil(wl.global_batch / (layout.gpus * wl.micro_batch))
    recompute = not student_memory(model, layout, False, cl, wl).fits
    mem = student_memory(model, layout, recompute, cl, wl)
    t_mb, compute, comm = student_micro_s(model, layout, recompute, cl, wl, extra)
    gen = generate_s(model, layout, cl, wl)
    optimizer = OPTIMIZER_BYTES_PER_PARAM * model.params() / layout.dp_shard / cl.hbm_bytes_per_s
    step = micro * t_mb + gen + optimizer
    return StudentCost(
        layout, wl.global_batch / step, step, micro * compute, micro * comm, gen, micro, recompute, mem
    )


# ---------------------------------------------------------------------------------------------- transport
def transport_samples_per_s(
    teacher: ModelShape, t: TeacherLayout, s: StudentLayout, cl: Cluster, wl: Workload
) -> float:
    """Teacher -> student answers per second: the NICs of the replicas' first GPUs' nodes (sources) and of
    the student ranks (sinks), and for gRPC the streams in flight (student ranks × prefetch)."""
    per_token = wl.payload_bytes_per_token(teacher)
    link = cl.intra if cl.nodes == 1 else cl.inter
    source = t.replicas * min(t.gpus_per_replica, cl.gpus_per_node) * link.bytes_per_s
    sink = s.gpus * link.bytes_per_s
    rate = min(source, sink)
    if wl.transport == "grpc":
        rate = min(rate, s.gpus * wl.prefetch * cl.grpc_bytes_per_s)
    return rate / (per_token * wl.seq_len)


# ---------------------------------------------------------------------------------------------- symmetric
def symmetric_cost(
    teacher: ModelShape, student: ModelShape, cl: Cluster, wl: Workload, *, trl_default: bool = False
) -> SymmetricCost | None:
    """The best symmetric (TRL) layout over every FSDP/HSDP shape of all GPUs, with the teacher replicated
    when it fits beside the student and sharded like the student (ZeRO-3) otherwise; None if none fits.
    `trl_default`: the shape TRL gets from accelerate's default FSDP / ZeRO-3 config instead: both models
    fully sharded over all GPUs."""
    best: SymmetricCost | None = None
    shards = [cl.gpus] if trl_default else _divisors(cl.gpus)
    for shard in shards:
        layout = StudentLayout(shard, cl.gpus // shard)
        for teacher_sharded in (True,) if trl_default else (False, True):
            for recompute in (False, True):
                cost = _symmetric_one(teacher, student, layout, teacher_sharded, recompute, cl, wl)
                if cost.memory.fits and (best is None or cost.samples_per_s > best.samples_per_s):
                    best = cost
    return best


def _symmetric_one(
    teacher: ModelShape, student: ModelShape, layout: StudentLayout, sharded: bool, recompute: bool,
    cl: Cluster, wl: Workload,
) -> SymmetricCost:  # fmt: skip
    n, db = wl.tokens_per_request, wl.dtype_bytes
    t_flops = n * teacher.forward_flops_per_token(wl.seq_len)
    t_compute = t_flops / cl.flops
    shard_link = cl.link(layout.dp_shard > _gpus_per_node(layout, cl))
    gather = shard_link.allgather(layout.dp_shard, teacher.params() * db) if sharded else 0.0
    teacher_mb = _overlap(t_compute, gather, cl)  # ZeRO-3 prefetches the next block while this one computes
    student_mb, _, _ = student_micro_s(student, layout, recompute, cl, wl, 0.0)
    micro = math.ceil(wl.global_batch / (layout.gpus * wl.micro_batch))
    gen = generate_s(student, layout, cl, wl)
    step = micro * (teacher_mb + student_mb) + gen
    mem = student_memory(student, layout, recompute, cl, wl)
    t_weights = teacher.params() * db / (layout.dp_shard if sharded else 1)
    t_gathered = 2 * teacher.layer_params() * db if sharded else 0.0
    mem.parts["teacher"] = t_weights + t_gathered + n * teacher.vocab * FP32  # + its full-vocabulary logits
    return SymmetricCost(
        wl.global_batch / step, step, micro * teacher_mb, micro * student_mb + gen, sharded, layout,
        recompute, mem,
    )  # fmt: skip


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
