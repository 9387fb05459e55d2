"""The closed-form inflection point between horizontal (tensor) and vertical (pipeline) teacher splits.

    inf = inflection(teacher, gpus_per_replica=8, in_flight=10.7, cluster=cl, workload=wl)
    inf.m_star, inf.bandwidth_star, inf.favours

One replica on g GPUs, one request = n tokens (a student micro-batch), W = its forward FLOPs / the FLOP/s one
GPU reaches serving it (seconds on one GPU), a = n·hidden·dtype bytes (one activation tensor), B and α the bandwidth and
step latency of the link the split crosses, L layers, m requests in flight per replica. Per request:

    horizontal (TP = g):  T_H = W/g + 4L(g−1)·(a/(g·B) + α)          2 ring all-reduces per layer
    vertical   (PP = g):  T_V = (W/g + a/B + α) · (m + g − 1)/m      one hop per stage, fill/drain bubble

They trade places at (docs/planner.md derives both and states the assumptions)

    m* = (g−1)(W/g + a/B + α) / (4L(g−1)(a/(g·B) + α) − a/B − α)         PP wins for m > m*
    B* = a(4L(g−1)/g − q) / ((W/g)(q−1) + α(q − 4L(g−1))),  q = (m+g−1)/m   PP wins for B < B*

More requests in flight (a deeper teacher.prefetch, more student ranks per replica) lower the bubble: B* rises
and PP wins on faster links; a faster link lowers TP's cost: m* rises and PP needs more requests in flight.
These are exactly the cost model's pure-TP and pure-PP replicas (asymkd/planner/cost.py) when g fits in a node.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from asymkd.planner.cluster import GB, Cluster, Link, Workload
from asymkd.planner.presets import ModelShape


@dataclass(frozen=True)
class Inflection:
    gpus_per_replica: int
    link: str
    in_flight: float
    request_compute_s: float
    activation_bytes: float
    bandwidth_gbps: float
    latency_us: float
    tp_request_s: float
    pp_request_s: float
    m_star: float | None
    bandwidth_star_gbps: float | None
    favours: str

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("m_star", "bandwidth_star_gbps"):
            if out[key] is not None and math.isinf(out[key]):
                out[key] = "inf"  # JSON has no infinity
        out["formula"] = {
            "m_star": "(g-1)(W/g + a/B + α) / (4L(g-1)(a/(gB) + α) - a/B - α)",
            "bandwidth_star": "a(4L(g-1)/g - q) / ((W/g)(q-1) + α(q - 4L(g-1))), q = (m+g-1)/m",
            "rule": "pipeline (vertical) wins when m > m_star, i.e. when B < bandwidth_star",
        }
        return out


def request_terms(model: ModelShape, cl: Cluster, wl: Workload) -> tuple[float, float]:
    """(W, a): one request's forward seconds on one GPU and its activation bytes."""
    n = wl.tokens_per_request
    flops = n * model.forward_flops_per_token(wl.seq_len, output_layer=wl.signal != "hidden")
    return flops / cl.teacher_flops, n * model.hidden * wl.dtype_bytes


def horizontal_s(w: float, a: float, layers: int, g: int, link: Link) -> float:
    """T_H: one request through a TP = g replica."""
    return w / g + 4 * layers * (g - 1) * (a / (g * link.bytes_per_s) + link.latency_s)


def vertical_s(w: float, a: float, g: int, m: float, link: Link) -> float:
    """T_V: one request's share of a PP = g replica's time with m requests in flight (m ≥ 1)."""
    m = max(m, 1.0)
    return (w / g + a / link.bytes_per_s + link.latency_s) * (m + g - 1) / m


def m_star(w: float, a: float, layers: int, g: int, link: Link) -> float:
    """Requests in flight per replica above which PP = g beats TP = g (inf: TP always wins)."""
    b, alpha = link.bytes_per_s, link.latency_s
    stage = w / g + a / b + alpha
    extra = 4 * layers * (g - 1) * (a / (g * b) + alpha) - a / b - alpha  # T_H − (T_V without bubble)
    return (g - 1) * stage / extra if extra > 0 else math.inf


def bandwidth_star(w: float, a: float, layers: int, g: int, m: float, latency_s: float) -> float:
    """Link bandwidth (bytes/s) below which PP = g beats TP = g with m in flight (inf: PP always wins;
    0: TP always wins)."""
    q = (max(m, 1.0) + g - 1) / max(m, 1.0)
    num = a * (4 * layers * (g - 1) / g - q)
    den = (w / g) * (q - 1) + latency_s * (q - 4 * layers * (g - 1))
    if num <= 0:
        return 0.0
    return num / den if den > 0 else math.inf


def inflection(
    model: ModelShape, *, gpus_per_replica: int, in_flight: float, cluster: Cluster, workload: Workload
) -> Inflection:
    """Both crossing points for a replica of `gpus_per_replica` GPUs over the link its split would cross."""
    g = max(gpus_per_replica, 2)  # one GPU has nothing to split: show the first split (g = 2)
    spans = g > cluster.gpus_per_node
    link = cluster.link(spans)
    w, a = request_terms(model, cluster, workload)
    t_h = horizontal_s(w, a, model.layers, g, link)
    t_v = vertical_s(w, a, g, in_flight, link)
    b_star = bandwidth_star(w, a, model.layers, g, in_flight, link.latency_s)
    return Inflection(
        gpus_per_replica=g,
        link="inter" if spans else "intra",
        in_flight=in_flight,
        request_compute_s=w,
        activation_bytes=a,
        bandwidth_gbps=link.bytes_per_s / GB,
        latency_us=link.latency_s * 1e6,
        tp_request_s=t_h,
        pp_request_s=t_v,
        m_star=m_star(w, a, model.layers, g, link),
        bandwidth_star_gbps=b_star / GB if not math.isinf(b_star) else math.inf,
        favours="pp" if t_v < t_h else "tp",
    )
