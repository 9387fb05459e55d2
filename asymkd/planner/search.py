"""Enumerate every teacher/student split of the cluster, cost each, and pick the best and the runner-up.

    result = search(teacher, student, cluster, workload)     # PlanResult; NoPlanError if nothing fits
    result.best, result.runner_up, result.symmetric, result.gain_over_symmetric

Splits: each side on whole nodes (a SLURM heterogeneous job component / a Kubernetes node pool), or both on
every node with g GPUs for the teacher and the rest for the student (the only kind on one node). Teacher layouts:
replicas × TP × PP with TP inside a node, TP dividing the attention heads (and the KV heads, or a multiple
of them: vLLM replicates KV heads below one per rank), PP dividing the layers, replicas packing nodes.
Student layouts: every dp_shard × dp_replicate = the student's GPUs. The symmetric layout (TRL: both models
on every GPU, one after the other) is a candidate too: when no split beats it, it is the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asymkd.planner.cluster import GB, Cluster, Workload
from asymkd.planner.cost import (
    StudentCost,
    StudentLayout,
    SymmetricCost,
    TeacherCost,
    TeacherLayout,
    _divisors,
    _symmetric_one,
    student_cost,
    symmetric_cost,
    teacher_cost,
    transport_samples_per_s,
)
from asymkd.planner.presets import ModelShape


class NoPlanError(ValueError):
    """No layout fits in memory; the message carries the numbers."""


@dataclass
class Plan:
    """One candidate: `split` (teacher and student on their own GPUs) or `symmetric` (TRL's layout)."""

    kind: str
    samples_per_s: float
    bottleneck: str
    teacher: TeacherCost | None = None
    student: StudentCost | None = None
    transport_samples_per_s: float | None = None
    split: Split | None = None
    symmetric: SymmetricCost | None = None


@dataclass
class PlanResult:
    best: Plan
    runner_up: Plan | None
    symmetric: SymmetricCost | None
    candidates: list[Plan] = field(default_factory=list)
    trl_default: SymmetricCost | None = None

    @property
    def gain_over_symmetric(self) -> float | None:
        if self.symmetric is None:
            return None
        return self.best.samples_per_s / self.symmetric.samples_per_s


# ------------------------------------------------------------------------------------------- enumeration
@dataclass(frozen=True)
class Split:
    """Teacher on t_nodes × t_per_node GPUs, student on s_nodes × s_per_node; `shared`: the same nodes."""

    t_nodes: int
    t_per_node: int
    s_nodes: int
    s_per_node: int
    shared: bool

    @property
    def teacher_gpus(self) -> int:
        return self.t_nodes * self.t_per_node

    @property
    def student_gpus(self) -> int:
        return self.s_nodes * self.s_per_node


def splits(cl: Cluster) -> list[Split]:
    """Whole nodes per side (a SLURM hetjob component / a node pool), or on every node g GPUs for the
    teacher and the rest for the student (one node: the only kind)."""
    gpn, n = cl.gpus_per_node, cl.nodes
    out = [Split(k, gpn, n - k, gpn, False) for k in range(1, n)]
    return out + [Split(n, g, n, gpn - g, True) for g in range(1, gpn)]


def tp_degrees(model: ModelShape, per_node: int) -> list[int]:
    """TP sizes vLLM accepts for `model` inside one node: dividing heads; dividing or a multiple of KV heads."""
    return [
        t
        for t in _divisors(model.heads)
        if t <= per_node and (model.kv_heads % t == 0 or t % model.kv_heads == 0)
    ]


def teacher_layouts(model: ModelShape, nodes: int, per_node: int) -> list[TeacherLayout]:
    """replicas × tp × pp over nodes × per_node GPUs: TP inside a node, PP dividing the layers, a replica
    packing into a node's share or filling whole shares of several nodes."""
    gpus, out = nodes * per_node, []
    for tp in tp_degrees(model, per_node):
        for pp in _divisors(model.layers):
            g = tp * pp
            if g > gpus or gpus % g or (g <= per_node and per_node % g) or (g > per_node and g % per_node):
                continue
            out.append(TeacherLayout(gpus // g, tp, pp, per_node))
    return out


def student_layouts(nodes: int, per_node: int) -> list[StudentLayout]:
    gpus = nodes * per_node
    return [StudentLayout(d, gpus // d, per_node) for d in _divisors(gpus)]


# ------------------------------------------------------------------------------------------------ search
def search(teacher: ModelShape, student: ModelShape, cl: Cluster, wl: Workload) -> PlanResult:
    """Every split, teacher layout and student layout that fits; the symmetric layout; ranked by samples/s."""
    plans: list[Plan] = []
    tried_t: list[TeacherCost] = []
    tried_s: list[StudentCost] = []
    for sp in splits(cl):
        s_costs = [
            student_cost(student, lay, cl, wl, teacher=teacher)
            for lay in student_layouts(sp.s_nodes, sp.s_per_node)
        ]
        t_costs = [
            teacher_cost(teacher, lay, cl, wl, student_ranks=sp.student_gpus)
            for lay in teacher_layouts(teacher, sp.t_nodes, sp.t_per_node)
        ]
        tried_t += t_costs
        tried_s += s_costs
        for t in (c for c in t_costs if c.memory.fits):
            for s in (c for c in s_costs if c.memory.fits):
                plans.append(_split_plan(teacher, t, s, sp, cl, wl))
    sym = symmetric_cost(teacher, student, cl, wl)
    if sym is not None:
        plans.append(Plan("symmetric", sym.samples_per_s, _symmetric_bottleneck(sym), symmetric=sym))
    if not plans:
        raise NoPlanError(_refusal(teacher, student, tried_t, tried_s, cl, wl))
    plans.sort(key=_rank)
    best = plans[0]
    runner = next((p for p in plans[1:] if _teacher_key(p) != _teacher_key(best)), None)
    trl = symmetric_cost(teacher, student, cl, wl, trl_default=True)
    return PlanResult(best, runner, sym, plans, trl)


def _split_plan(
    teacher: ModelShape, t: TeacherCost, s: StudentCost, sp: Split, cl: Cluster, wl: Workload
) -> Plan:
    x = transport_samples_per_s(teacher, t.layout, s.layout, cl, wl)
    sides = {"teacher": t.samples_per_s, "student": s.samples_per_s, "transport": x}
    bottleneck = min(sides, key=sides.__getitem__)
    return Plan("split", sides[bottleneck], bottleneck, t, s, x, split=sp)


def _symmetric_bottleneck(sym: SymmetricCost) -> str:
    return "teacher (sequential)" if sym.teacher_s >= sym.student_s else "student (sequential)"


def _rank(p: Plan) -> tuple:
    """Fastest first; on a tie fewer teacher GPUs, then less pipeline, then more student sharding."""
    if p.teacher is None:
        return (-p.samples_per_s, 1, 0, 0, 0)
    t, s = p.teacher.layout, p.student.layout  # type: ignore[union-attr]
    return (-round(p.samples_per_s, 9), 0, t.gpus, t.pp, -t.per_node, -s.dp_shard)


def _teacher_key(p: Plan) -> tuple:
    if p.teacher is None:
        return ("symmetric",)
    t = p.teacher.layout
    return (t.gpus, t.per_node, t.tp, t.pp)


# ------------------------------------------------------------------------------------------------ refusal
def _refusal(
    teacher: ModelShape, student: ModelShape, tried_t: list[TeacherCost], tried_s: list[StudentCost],
    cl: Cluster, wl: Workload,
) -> str:  # fmt: skip
    """Why nothing fits, with the numbers: each side's smallest footprint per GPU against the usable memory."""
    where = f"{cl.nodes} × {cl.gpus_per_node} {cl.name} ({cl.mem_bytes / GB:.0f} GB per GPU, "
    where += f"{cl.reserve_bytes / GB:.0f} GB reserved)"
    parts = [f"no plan fits on {where}"]
    side_t = _smallest(tried_t, lambda c: f"TP {c.layout.tp} × PP {c.layout.pp}")
    side_s = _smallest(tried_s, lambda c: f"FSDP {c.layout.dp_shard} × {c.layout.dp_replicate}")
    parts.append(
        f"teacher {teacher.name} ({teacher.params() / 1e9:.1f}B params): "
        + (side_t or f"no TP × PP layout divides its {teacher.heads} heads / {teacher.layers} layers here")
    )
    parts.append(f"student {student.name} ({student.params() / 1e9:.1f}B params): " + (side_s or "no layout"))
    if side_t == side_s == "fits":
        parts.append("but never both in the same split")
    sym = _symmetric_one(teacher, student, StudentLayout(cl.gpus, 1), True, True, cl, wl)
    parts.append(f"symmetric (both fully sharded over all {cl.gpus} GPUs): {sym.memory.describe()}")
    return "; ".join(parts)


def _smallest(costs: list, name) -> str:
    fits = [c for c in costs if c.memory.fits]
    if fits:
        return "fits"
    if not costs:
        return ""
    c = min(costs, key=lambda c: c.memory.total)
    return f"smallest footprint {name(c)}: {c.memory.describe()}"
