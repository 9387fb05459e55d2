"""How a plan is shown: text (the default), one JSON object (`--json`), a markdown table row (`--markdown`).

    data = as_dict(result, inflection, teacher, student, cluster, workload)   # what --json prints
    print(as_text(data)) / print(as_markdown_row(data))

The JSON keys `best`, `runner_up`, `symmetric_samples_per_s`, `gain_over_symmetric`, `inflection` are a contract.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from asymkd.planner.cluster import GB, Cluster, Workload
from asymkd.planner.inflection import Inflection
from asymkd.planner.presets import ModelShape
from asymkd.planner.search import Plan, PlanResult


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{digits}g}")


def plan_dict(p: Plan | None, gpus: int) -> dict[str, Any] | None:
    """A plan as the JSON contract: teacher {replicas, tp, pp, gpus}, student {dp_shard, dp_replicate, gpus}."""
    if p is None:
        return None
    if p.kind == "symmetric":
        sym = p.symmetric
        assert sym is not None
        lay = sym.student
        teacher = {"replicas": lay.dp_replicate if sym.teacher_sharded else gpus, "tp": 1, "pp": 1}
        teacher |= {"gpus": gpus, "colocated": True, "zero3_sharded": sym.teacher_sharded}
        student = {"dp_shard": lay.dp_shard, "dp_replicate": lay.dp_replicate, "gpus": gpus}
        student |= {"activation_checkpointing": sym.recompute}
        return {
            "kind": "symmetric", "teacher": teacher, "student": student,
            "samples_per_s": _r(p.samples_per_s), "bottleneck": p.bottleneck,
            "teacher_s_per_step": _r(sym.teacher_s), "student_s_per_step": _r(sym.student_s),
            "memory_per_gpu_gb": _r(sym.memory.total / GB, 3),
        }  # fmt: skip
    t, s, sp = p.teacher, p.student, p.split
    assert t is not None and s is not None and sp is not None
    lt, ls = t.layout, s.layout
    return {
        "kind": "split",
        "teacher": {"replicas": lt.replicas, "tp": lt.tp, "pp": lt.pp, "gpus": lt.gpus}
        | {"nodes": sp.t_nodes, "gpus_per_node": sp.t_per_node},
        "student": {"dp_shard": ls.dp_shard, "dp_replicate": ls.dp_replicate, "gpus": ls.gpus}
        | {"nodes": sp.s_nodes, "gpus_per_node": sp.s_per_node},
        "shared_nodes": sp.shared,
        "samples_per_s": _r(p.samples_per_s),
        "bottleneck": p.bottleneck,
        "teacher_samples_per_s": _r(t.samples_per_s),
        "student_samples_per_s": _r(s.samples_per_s),
        "transport_samples_per_s": _r(p.transport_samples_per_s),
        "teacher_detail": {
            "stage_s": _r(t.stage_s), "compute_s": _r(t.compute_s), "tp_comm_s": _r(t.tp_comm_s),
            "pp_hop_s": _r(t.hop_s), "in_flight_per_replica": _r(t.in_flight),
            "pipeline_busy": _r(t.busy, 3), "memory_per_gpu_gb": _r(t.memory.total / GB, 3),
        },
        "student_detail": {
            "step_s": _r(s.step_s), "compute_s": _r(s.compute_s), "fsdp_comm_s": _r(s.comm_s),
            "generate_s": _r(s.generate_s), "micro_batches_per_rank": s.micro_batches,
            "activation_checkpointing": s.recompute, "memory_per_gpu_gb": _r(s.memory.total / GB, 3),
        },
    }  # fmt: skip


def as_dict(
    result: PlanResult, inf: Inflection, teacher: ModelShape, student: ModelShape, cl: Cluster, wl: Workload
) -> dict[str, Any]:
    sym, trl = result.symmetric, result.trl_default
    return {
        "teacher_model": {"name": teacher.name, "params_b": _r(teacher.params() / 1e9)} | asdict(teacher),
        "student_model": {"name": student.name, "params_b": _r(student.params() / 1e9)} | asdict(student),
        "cluster": {
            "nodes": cl.nodes,
            "gpus_per_node": cl.gpus_per_node,
            "gpu": cl.name,
            "mem_gb": _r(cl.mem_bytes / GB),
            "tflops_reached": _r(cl.flops / 1e12),
            "intra_gbps_reached": _r(cl.intra.bytes_per_s / GB),
            "inter_gbps_reached": _r(cl.inter.bytes_per_s / GB),
        },
        "workload": asdict(wl),
        "best": plan_dict(result.best, cl.gpus),
        "runner_up": plan_dict(result.runner_up, cl.gpus),
        "symmetric_samples_per_s": _r(sym.samples_per_s) if sym else None,
        "symmetric": plan_dict(Plan("symmetric", sym.samples_per_s, "", symmetric=sym), cl.gpus)
        if sym
        else None,
        "gain_over_symmetric": _r(result.gain_over_symmetric),
        "trl_default_samples_per_s": _r(trl.samples_per_s) if trl else None,
        "gain_over_trl_default": _r(result.best.samples_per_s / trl.samples_per_s) if trl else None,
        "inflection": inf.as_dict(),
        "candidates": len(result.candidates),
    }


# ------------------------------------------------------------------------------------------------- text
def layout_text(p: dict[str, Any] | None) -> str:
    if p is None:
        return "—"
    t, s = p["teacher"], p["student"]
    if p["kind"] == "symmetric":
        how = "ZeRO-3 sharded" if t["zero3_sharded"] else "replicated"
        return f"symmetric: both on all {s['gpus']} GPUs (teacher {how}, student FSDP {s['dp_shard']} × {s['dp_replicate']})"
    if p["shared_nodes"]:
        where_t = f" ({t['gpus_per_node']} per node on {t['nodes']} nodes)" if t["nodes"] > 1 else ""
        where_s = f" ({s['gpus_per_node']} per node)" if s["nodes"] > 1 else ""
    else:
        where_t, where_s = f" on {t['nodes']} nodes", f" on {s['nodes']} nodes"
    return (
        f"teacher {t['replicas']} × (TP {t['tp']} × PP {t['pp']}) = {t['gpus']} GPUs{where_t}; "
        f"student FSDP {s['dp_shard']} × {s['dp_replicate']} = {s['gpus']} GPUs{where_s}"
    )


def _sides_text(p: dict[str, Any]) -> str:
    if p["kind"] == "symmetric":
        return f"teacher {p['teacher_s_per_step']:.3g} s + student {p['student_s_per_step']:.3g} s per step"
    return (
        f"teacher {p['teacher_samples_per_s']:.4g}, student {p['student_samples_per_s']:.4g}, "
        f"transport {p['transport_samples_per_s']:.4g} samples/s"
    )


def _detail_lines(p: dict[str, Any]) -> list[str]:
    if p["kind"] == "symmetric":
        return [f"{'':11}memory {p['memory_per_gpu_gb']} GB per GPU"]
    t, s = p["teacher_detail"], p["student_detail"]
    return [
        f"{'':11}teacher stage {t['stage_s']:.3g} s per request (compute {t['compute_s']:.3g}, TP "
        f"{t['tp_comm_s']:.3g}, hop {t['pp_hop_s']:.3g}); {t['in_flight_per_replica']:.3g} in flight per "
        f"replica, pipeline {100 * t['pipeline_busy']:.0f}% busy; {t['memory_per_gpu_gb']} GB per GPU",
        f"{'':11}student step {s['step_s']:.3g} s ({s['micro_batches_per_rank']} micro-batches per rank, "
        f"compute {s['compute_s']:.3g}, FSDP {s['fsdp_comm_s']:.3g} overlapped, generate {s['generate_s']:.3g}"
        f"{', activation checkpointing' if s['activation_checkpointing'] else ''}); "
        f"{s['memory_per_gpu_gb']} GB per GPU",
    ]


def inflection_text(inf: dict[str, Any]) -> str:
    m_star, b_star = inf["m_star"], inf["bandwidth_star_gbps"]
    m_s = "never (TP always wins)" if m_star == "inf" else f"{m_star:.3g}"
    b_s = "any bandwidth" if b_star == "inf" else f"{b_star:.4g} GB/s"
    side = "pipeline (vertical)" if inf["favours"] == "pp" else "tensor (horizontal)"
    return (
        f"replica of {inf['gpus_per_replica']} GPUs over the {inf['link']}-node link "
        f"({inf['bandwidth_gbps']:.3g} GB/s reached, {inf['latency_us']:.3g} µs): {inf['in_flight']:.3g} requests "
        f"in flight vs m* = {m_s} -> {side} wins (TP {inf['tp_request_s']:.3g} s vs PP "
        f"{inf['pp_request_s']:.3g} s per request); at this depth they trade places at B* = {b_s}"
    )


def as_text(d: dict[str, Any], top: list[str] | None = None) -> str:
    t, s, cl, wl = d["teacher_model"], d["student_model"], d["cluster"], d["workload"]
    lines = [
        f"asymkd plan: {t['name']} ({t['params_b']:.3g}B) -> {s['name']} ({s['params_b']:.3g}B) on "
        f"{cl['nodes']} × {cl['gpus_per_node']} {cl['gpu']} ({cl['mem_gb']:.0f} GB, {cl['tflops_reached']:.3g} "
        f"TFLOP/s reached per GPU)",
        f"workload: {wl['global_batch']} × {wl['seq_len']} tokens per step, micro-batch {wl['micro_batch']}, "
        f"signal {wl['signal']} (k={wl['top_k']}) over {wl['transport']}, prefetch {wl['prefetch']}, "
        f"on-policy {wl['on_policy']:g}",
        "",
    ]
    for label, key in (("best", "best"), ("runner-up", "runner_up")):
        p = d[key]
        if p is None:
            lines.append(f"{label:<11}—")
            continue
        lines.append(f"{label:<11}{layout_text(p)}")
        lines.append(
            f"{'':11}{p['samples_per_s']:.4g} samples/s ({_sides_text(p)}); bottleneck: {p['bottleneck']}"
        )
        lines += _detail_lines(p)
    sym, gain = d["symmetric"], d["gain_over_symmetric"]
    if sym is None:
        lines.append(f"{'symmetric':<11}does not fit (both models on every GPU)")
    else:
        lines.append(
            f"{'symmetric':<11}{layout_text(sym)}: {sym['samples_per_s']:.4g} samples/s ({_sides_text(sym)})"
        )
        lines.append(f"{'gain':<11}{gain:.3g}× over the best symmetric layout")
    if d["trl_default_samples_per_s"] is not None:
        lines.append(
            f"{'':11}{d['gain_over_trl_default']:.3g}× over TRL's default (both models fully sharded over all "
            f"GPUs: {d['trl_default_samples_per_s']:.4g} samples/s)"
        )
    lines.append(f"{'inflection':<11}{inflection_text(d['inflection'])}")
    if top:
        lines += ["", f"top {len(top)} of {d['candidates']} plans:", *top]
    return "\n".join(lines)


MARKDOWN_HEADER = (
    "| teacher → student | GPUs | best plan | samples/s | bottleneck | runner-up (samples/s) | "
    "best symmetric samples/s | gain | TRL default samples/s | gain | TP↔PP: m in flight vs m* |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _num(x: float | None, suffix: str = "") -> str:
    return "—" if x is None else f"{x:.3g}{suffix}"


def as_markdown_row(d: dict[str, Any]) -> str:
    """One row under MARKDOWN_HEADER (`asymkd plan ... --markdown`; docs/planner.md's tables)."""
    best, runner, inf = d["best"], d["runner_up"], d["inflection"]
    gpus = d["cluster"]["nodes"] * d["cluster"]["gpus_per_node"]
    m_star = "∞" if inf["m_star"] == "inf" else f"{inf['m_star']:.3g}"
    runner_s = "—" if runner is None else f"{layout_text(runner)} ({runner['samples_per_s']:.3g})"
    gain, trl_gain = d["gain_over_symmetric"], d["gain_over_trl_default"]
    return (
        f"| {d['teacher_model']['name']} → {d['student_model']['name']} | {gpus} | {layout_text(best)} | "
        f"{best['samples_per_s']:.3g} | {best['bottleneck']} | {runner_s} | "
        f"{_num(d['symmetric_samples_per_s'])} | {'—' if gain is None else f'{gain:.2f}×'} | "
        f"{_num(d['trl_default_samples_per_s'])} | {'—' if trl_gain is None else f'{trl_gain:.2f}×'} | "
        f"g={inf['gpus_per_replica']}: {inf['in_flight']:.3g} vs {m_star} → {inf['favours'].upper()} |"
    )


def top_lines(result: PlanResult, n: int) -> list[str]:
    out = []
    for p in result.candidates[:n]:
        d = plan_dict(p, 0 if p.kind == "split" else (p.symmetric.student.gpus if p.symmetric else 0))
        if d is not None and not math.isnan(d["samples_per_s"]):
            out.append(f"  {d['samples_per_s']:>10.4g} samples/s  {layout_text(d)}  [{d['bottleneck']}]")
    return out
