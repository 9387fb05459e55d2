"""Numbers and the plot of bench/vs_trl.py: per-variant summaries, paired ratios, the bounds, the PNG.

Ratios are paired by repeat (asymkd and TRL ran back to back in the same repeat, so a load change between
repeats moves both), then summarized as median/min/max. Bounds per repeat: the sequential bound
1/(1/CE-only + 1/teacher-alone) when teacher and student share the cores, the pipeline bound
min(CE-only, teacher-alone) when each has its own cores (--split-cores).
"""

from __future__ import annotations

from pathlib import Path

from bench import benchlib as bl


def aggregate(runs: list[dict]) -> dict:
    names = list(dict.fromkeys(r["name"] for r in runs))
    out = {}
    for n in names:
        rs = [r for r in runs if r["name"] == n]
        out[n] = {
            k: bl.summarize([r.get(k) for r in rs])
            for k in (
                "samples_per_s",
                "total_peak_mb",
                "trainer_peak_mb",
                "teacher_peak_mb",
                "final_loss",
                "final_kd",
                "load_average_1m",
            )
            if any(r.get(k) is not None for r in rs)
        }
        curves = [r["loss_curve"] for r in rs if r.get("loss_curve")]
        if curves:
            out[n]["loss_curve_first_repeat"] = curves[0]
    return out


def paired_ratio(runs: list[dict], num: str, den: str) -> dict | None:
    """num/den samples/s per repeat (the two ran back to back in the same repeat), summarized."""
    by = {(r["name"], r["repeat"]): r["samples_per_s"] for r in runs}
    vals = [by[(num, i)] / by[(den, i)] for (n, i) in by if n == num and (den, i) in by]
    return bl.summarize(vals) if vals else None


def bound(runs: list[dict], ce: str, teacher: str, kind: str) -> list[tuple[int, float]]:
    """Per repeat: sequential 1/(1/CE + 1/T) (shared cores) or pipeline min(CE, T) (separate cores)."""
    by = {(r["name"], r["repeat"]): r["samples_per_s"] for r in runs}
    out = []
    for (n, i), c in by.items():
        if n == ce and (teacher, i) in by:
            t = by[(teacher, i)]
            out.append((i, 1.0 / (1.0 / c + 1.0 / t) if kind == "sequential" else min(c, t)))
    return out


def ratios(runs: list[dict]) -> dict:
    """asymkd/TRL per β (paired by repeat) and asymkd/bound, for every asymkd variant that ran."""
    names = {r["name"] for r in runs}
    betas = sorted({r["beta"] for r in runs if r.get("kind") == "trl"})
    backends = [be for be in ("hf", "vllm") if f"teacher_alone_{be}" in names]
    split = "ce_only_split" in names
    res: dict[str, dict | None] = {}
    for beta in betas:
        trl = f"trl_gkd_b{beta:g}"
        for be in backends:
            for sfx in [""] + (["_split"] if split else []):
                res[f"asymkd_{be}_topk_b{beta:g}{sfx} / {trl}"] = paired_ratio(
                    runs, f"asymkd_{be}_topk_b{beta:g}{sfx}", trl
                )
        if f"asymkd_hf_full_b{beta:g}" in names:
            res[f"asymkd_hf_full_b{beta:g} / {trl}"] = paired_ratio(runs, f"asymkd_hf_full_b{beta:g}", trl)
    bounds = {}
    for be in backends:
        for sfx, kind in [("", "sequential")] + ([("_split", "pipeline")] if split else []):
            name = f"{kind}_bound_{be}{sfx}"
            per = bound(runs, f"ce_only{sfx}", f"teacher_alone_{be}{sfx}", kind)
            bounds[name] = bl.summarize([v for _, v in per])
            for beta in betas:
                asym = f"asymkd_{be}_topk_b{beta:g}{sfx}"
                by = {r["repeat"]: r["samples_per_s"] for r in runs if r["name"] == asym}
                vals = [by[i] / v for i, v in per if i in by]
                res[f"{asym} / {name}"] = bl.summarize(vals) if vals else None
    return {
        "samples_per_s_ratios": {k: v for k, v in res.items() if v},
        "bounds_samples_per_s": bounds,
        "loss_agreement": loss_agreement(runs),
    }


def loss_agreement(runs: list[dict]) -> dict:
    """asymkd FULL vs TRL final loss per repeat: same init, data, optimizer and loss, so they must match
    (a check that the comparison is like for like); top-k gives a smaller value (a divergence over k+1
    classes is at most the full one)."""
    out = {}
    for r in runs:
        if r["name"].startswith("asymkd_hf_full_b"):
            trl = next(
                (t for t in runs if t["name"] == f"trl_gkd_b{r['beta']:g}" and t["repeat"] == r["repeat"]),
                None,
            )
            if trl and trl.get("final_loss") and r.get("final_loss") is not None:
                rel = abs(r["final_loss"] - trl["final_loss"]) / trl["final_loss"]
                out.setdefault(f"{r['name']} vs {trl['name']}", []).append(
                    {
                        "repeat": r["repeat"],
                        "asymkd": r["final_loss"],
                        "trl": trl["final_loss"],
                        "rel_diff": rel,
                    }
                )
    return out


# ------------------------------------------------------------------------------------------------- plot
def _color(name: str) -> str:
    for key, color in (
        ("trl", "#d62728"),
        ("full", "#9467bd"),
        ("vllm", "#2ca02c"),
        ("asymkd", "#1f77b4"),
        ("bound", "#bbbbbb"),
        ("teacher", "#7f7f7f"),
        ("ce_only", "#555555"),
    ):
        if key in name:
            return color
    return "#999999"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    rows = [(n, s["samples_per_s"]) for n, s in summ.items()]
    rows += [(n, s) for n, s in result["ratios"]["bounds_samples_per_s"].items() if s["n"]]
    mem = [(n, s) for n, s in summ.items() if "total_peak_mb" in s]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.42 * max(len(rows), len(mem)) + 2.2))
    labels = [n for n, _ in rows]
    loads = {n: s["load_average_1m"]["median"] for n, s in summ.items() if "load_average_1m" in s}
    tick_labels = [f"{n}  [load {loads[n]:.1f}]" if n in loads else n for n in labels]
    med = [s["median"] for _, s in rows]
    err = [[s["median"] - s["min"] for _, s in rows], [s["max"] - s["median"] for _, s in rows]]
    y = range(len(rows))
    ax1.barh(
        y,
        med,
        xerr=err,
        color=[_color(n) for n in labels],
        capsize=3,
        hatch=["//" if "bound" in n else "" for n in labels],
    )
    for i, v in enumerate(med):
        ax1.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax1.set_yticks(list(y), tick_labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("samples/s (median of repeats; bars: min–max; [1-min load average after the run])")
    ax1.set_title("Throughput (higher is better)")
    m_labels = [n for n, _ in mem]
    trainer = [(s.get("trainer_peak_mb") or s["total_peak_mb"])["median"] / 1024 for _, s in mem]
    teacher = [(s.get("teacher_peak_mb") or {"median": 0})["median"] / 1024 for _, s in mem]
    y2 = range(len(mem))
    ax2.barh(y2, trainer, color=[_color(n) for n in m_labels], label="trainer process (TRL: the one process)")
    ax2.barh(y2, teacher, left=trainer, color="#cccccc", label="teacher server process tree")
    for i, (a, b) in enumerate(zip(trainer, teacher, strict=True)):
        ax2.text(a + b, i, f" {a + b:.2f}", va="center", fontsize=8)
    ax2.set_yticks(list(y2), m_labels, fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("peak RSS, GiB")
    ax2.set_title("Peak memory (lower is better)")
    ax2.legend(fontsize=8, loc="lower right")
    cfg, mach = result["config"], result["machine"]
    fig.suptitle(
        f"asymkd vs TRL GKD — teacher {cfg['teacher_params_m']:.0f}M / student {cfg['student_params_m']:.0f}M, "
        f"batch {cfg['batch_size']}×{cfg['seq_len']}, {cfg['steps']} steps, {cfg['precision']} — "
        f"{mach['cpu_count']} cores {mach['cpu_model']}, load {mach['load_average_1_5_15'][0]}",
        fontsize=10,
    )
    bl.save_figure(fig, path)


_fmt, _mb = bl.fmt_summary, bl.fmt_gib


def as_table(result: dict) -> str:
    """Markdown: one row per variant (medians, min–max over repeats), then the ratios."""
    summ, rat = result["summary"], result["ratios"]
    lines = [
        "| variant | samples/s | peak RSS trainer / teacher / total (GiB) | final loss |",
        "|---|---|---|---|",
    ]
    for name, s in summ.items():
        mem = f"{_mb(s.get('trainer_peak_mb'))} / {_mb(s.get('teacher_peak_mb'))} / {_mb(s.get('total_peak_mb'))}"
        loss = _fmt(s.get("final_loss"), 5) if "final_loss" in s else "—"
        lines.append(f"| {name} | {_fmt(s['samples_per_s'])} | {mem} | {loss} |")
    for name, s in rat["bounds_samples_per_s"].items():
        if s["n"]:
            lines.append(f"| *{name}* | {_fmt(s)} | | |")
    lines += ["", "| ratio (paired by repeat) | median (min–max) |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rat["samples_per_s_ratios"].items()]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.vs_trl_report RESULT.json [--plot]: table (and PNG) from a JSON
    import json
    import sys

    res = json.loads(Path(sys.argv[1]).read_text())
    if "--plot" in sys.argv:
        plot(res, Path(sys.argv[1]).with_suffix(".png"))
    print(as_table(res))
