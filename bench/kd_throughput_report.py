"""Numbers and the plot of bench/kd_throughput.py: summaries, bounds, paired ratios, targets, the PNG.

Ratios are paired by repeat (the variants ran back to back in the same repeat, so a load change between
repeats moves all of them), then summarized as median/min/max. Bounds per repeat: sequential
1/(1/CE-only + 1/teacher-alone) on shared cores; pipeline min(CE-only, teacher-alone) with --split-cores.
Targets (issue 3): asymkd KD ≥ 0.9 × the sequential bound; its trainer's peak memory ≤ 1.1 × CE-only's.
"""

from __future__ import annotations

from pathlib import Path

from bench import benchlib as bl
from bench.vs_trl_report import aggregate, bound

CE, SERVED, IN_PROCESS, TEACHER = "ce_only", "asymkd_kd", "inprocess_kd", "teacher_alone"
THROUGHPUT_TARGET, MEMORY_TARGET = 0.9, 1.1
LABELS = {
    CE: "(a) CE-only student",
    SERVED: "(b) asymkd KD (teacher server)",
    IN_PROCESS: "(c) sequential KD (in-process teacher)",
    TEACHER: "teacher alone (scoring the same batches)",
    "sequential_bound": "sequential bound 1/(1/(a) + 1/teacher)",
    "pipeline_bound_split": "pipeline bound min((a), teacher), split cores",
}


def paired(runs: list[dict], num: str, den: str, key: str = "samples_per_s") -> dict | None:
    """num/den of `key` per repeat, summarized (None when no repeat has both)."""
    by = {(r["name"], r["repeat"]): r.get(key) for r in runs}
    vals = [v / by[(den, i)] for (n, i), v in by.items() if n == num and v and by.get((den, i))]
    return bl.summarize(vals) if vals else None


def versus_bound(runs: list[dict], name: str, per_repeat: list[tuple[int, float]]) -> dict | None:
    by = {r["repeat"]: r["samples_per_s"] for r in runs if r["name"] == name}
    vals = [by[i] / v for i, v in per_repeat if i in by]
    return bl.summarize(vals) if vals else None


def ratios(runs: list[dict]) -> dict:
    names = {r["name"] for r in runs}
    seq = bound(runs, CE, TEACHER, "sequential")
    bounds = {"sequential_bound": bl.summarize([v for _, v in seq])}
    sps = {
        f"{SERVED} / sequential_bound": versus_bound(runs, SERVED, seq),
        f"{IN_PROCESS} / sequential_bound": versus_bound(runs, IN_PROCESS, seq),
        f"{SERVED} / {IN_PROCESS}": paired(runs, SERVED, IN_PROCESS),
        f"{SERVED} / {CE}": paired(runs, SERVED, CE),
    }
    if f"{CE}_split" in names:
        pipe = bound(runs, f"{CE}_split", f"{TEACHER}_split", "pipeline")
        bounds["pipeline_bound_split"] = bl.summarize([v for _, v in pipe])
        sps[f"{SERVED}_split / pipeline_bound_split"] = versus_bound(runs, f"{SERVED}_split", pipe)
        sps[f"{SERVED}_split / sequential_bound"] = versus_bound(runs, f"{SERVED}_split", seq)
        sps[f"{SERVED}_split / {IN_PROCESS}"] = paired(runs, f"{SERVED}_split", IN_PROCESS)
    mem = {
        f"{SERVED} / {CE} (trainer peak)": paired(runs, SERVED, CE, "trainer_peak_mb"),
        f"{IN_PROCESS} / {CE} (trainer peak)": paired(runs, IN_PROCESS, CE, "trainer_peak_mb"),
        f"{SERVED} / {CE} (trainer + teacher peak)": paired(runs, SERVED, CE, "total_peak_mb"),
    }
    t_ratio, m_ratio = sps[f"{SERVED} / sequential_bound"], mem[f"{SERVED} / {CE} (trainer peak)"]
    want = f">= {THROUGHPUT_TARGET} x sequential bound"
    targets = {
        "throughput": _target(t_ratio, want + " (shared cores)", THROUGHPUT_TARGET, 1),
        "memory": _target(m_ratio, f"<= {MEMORY_TARGET} x CE-only trainer peak", MEMORY_TARGET, -1),
    }
    split = sps.get(f"{SERVED}_split / sequential_bound")
    if split:  # teacher and student on their own cores: the placement asymkd is built for
        targets["throughput_split"] = _target(split, want + " (split cores)", THROUGHPUT_TARGET, 1)
    return {
        "samples_per_s_ratios": {k: v for k, v in sps.items() if v},
        "peak_memory_ratios": {k: v for k, v in mem.items() if v},
        "bounds_samples_per_s": bounds,
        "targets": targets,
        "loss_agreement": loss_agreement(runs),
    }


def _target(s: dict | None, want: str, limit: float, sign: int) -> dict:
    med = s["median"] if s else None
    return {"want": want, "median": med, "met": None if med is None else sign * (med - limit) >= 0}


def loss_agreement(runs: list[dict]) -> list[dict]:
    """(b) and (c) train the same student on the same rows with the same teacher answers: their final KD
    losses must agree (the check that the two do the same work)."""
    out = []
    for r in runs:
        if r["name"] == IN_PROCESS and r.get("final_kd") is not None:
            b = next((x for x in runs if x["name"] == SERVED and x["repeat"] == r["repeat"]), None)
            if b and b.get("final_kd"):
                rel = abs(r["final_kd"] - b["final_kd"]) / abs(b["final_kd"])
                out.append(
                    {"repeat": r["repeat"], SERVED: b["final_kd"], IN_PROCESS: r["final_kd"], "rel_diff": rel}
                )
    return out


def summarize(runs: list[dict]) -> dict:
    """Per variant: vs_trl_report.aggregate's summaries, plus the mean teacher wait per step."""
    out = aggregate(runs)
    for name, s in out.items():
        waits = [r.get("teacher_wait_ms_mean") for r in runs if r["name"] == name]
        if any(w is not None for w in waits):
            s["teacher_wait_ms_mean"] = bl.summarize(waits)
    return out


# ------------------------------------------------------------------------------------------------- plot
def _color(name: str) -> str:
    palette = {CE: "#555555", SERVED: "#1f77b4", IN_PROCESS: "#d62728", TEACHER: "#7f7f7f"}
    return "#bbbbbb" if "bound" in name else palette.get(name.removesuffix("_split"), "#999999")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    rows = [(n, s["samples_per_s"]) for n, s in summ.items()]
    rows += [(n, s) for n, s in result["ratios"]["bounds_samples_per_s"].items() if s["n"]]
    mem = [(n, s) for n, s in summ.items() if "trainer_peak_mb" in s]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * max(len(rows), len(mem)) + 2.4))
    names = [n for n, _ in rows]
    med = [s["median"] for _, s in rows]
    err = [[s["median"] - s["min"] for _, s in rows], [s["max"] - s["median"] for _, s in rows]]
    hatch = ["//" if "bound" in n else "" for n in names]
    ax1.barh(range(len(rows)), med, xerr=err, color=[_color(n) for n in names], capsize=3, hatch=hatch)
    for i, v in enumerate(med):
        ax1.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    seq = result["ratios"]["bounds_samples_per_s"]["sequential_bound"]
    if seq["n"]:
        ax1.axvline(THROUGHPUT_TARGET * seq["median"], color="#1f77b4", ls="--", lw=1,
                    label=f"target for (b): {THROUGHPUT_TARGET} × sequential bound")  # fmt: skip
        ax1.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    ax1.set_yticks(range(len(rows)), [LABELS.get(n, n) for n in names], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel("samples/s (median of repeats; bars: min–max)")
    ax1.set_title("Throughput (higher is better)")
    trainer = [s["trainer_peak_mb"]["median"] / 1024 for _, s in mem]
    teacher = [(s.get("teacher_peak_mb") or {"median": 0})["median"] / 1024 for _, s in mem]
    y2 = range(len(mem))
    ax2.barh(y2, trainer, color=[_color(n) for n, _ in mem])
    ax2.barh(y2, teacher, left=trainer, color="#cccccc", label="teacher server process tree")
    for i, (a, b) in enumerate(zip(trainer, teacher, strict=True)):
        ax2.text(a + b, i, f" {a:.2f}" + (f" + {b:.2f}" if b else ""), va="center", fontsize=8)
    ax2.set_xlim(0, 1.3 * max(a + b for a, b in zip(trainer, teacher, strict=True)))
    if CE in summ:
        ax2.axvline(MEMORY_TARGET * summ[CE]["trainer_peak_mb"]["median"] / 1024, color="#1f77b4", ls="--",
                    lw=1, label=f"target for (b)'s trainer: {MEMORY_TARGET} × (a)")  # fmt: skip
    ax2.set_yticks(list(y2), [LABELS.get(n, n) for n, _ in mem], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("peak RSS, GiB (trainer process, + teacher server for (b))")
    ax2.set_title("Peak memory (lower is better)")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    cfg, mach = result["config"], result["machine"]
    fig.suptitle(
        f"KD throughput — teacher {cfg['teacher_params_m']:.0f}M / student {cfg['student_params_m']:.0f}M, "
        f"batch {cfg['batch_size']}×{cfg['seq_len']}, top-{cfg['top_k']} forward KL, {cfg['steps']} steps, "
        f"{cfg['precision']} — {mach['cpu_count']} cores {mach['cpu_model']}, load {mach['load_average_1_5_15'][0]}",
        fontsize=10,
    )
    bl.save_figure(fig, path)


def as_table(result: dict) -> str:
    """Markdown: one row per variant (medians, min–max over repeats), then ratios and targets."""
    summ, rat = result["summary"], result["ratios"]
    lines = [
        "| variant | samples/s | peak RSS trainer / teacher (GiB) | teacher wait ms/step |",
        "|---|---|---|---|",
    ]
    for name, s in summ.items():
        mem = f"{bl.fmt_gib(s.get('trainer_peak_mb'))} / {bl.fmt_gib(s.get('teacher_peak_mb'))}"
        wait = bl.fmt_summary(s.get("teacher_wait_ms_mean"), 0)
        lines.append(f"| {LABELS.get(name, name)} | {bl.fmt_summary(s['samples_per_s'])} | {mem} | {wait} |")
    for name, s in rat["bounds_samples_per_s"].items():
        if s["n"]:
            lines.append(f"| *{name}* | {bl.fmt_summary(s)} | | |")
    lines += ["", "| ratio (paired by repeat) | median (min–max) |", "|---|---|"]
    for group in ("samples_per_s_ratios", "peak_memory_ratios"):
        lines += [f"| {k} | {bl.fmt_summary(v)} |" for k, v in rat[group].items()]
    lines += [""] + [f"target {k}: {t['want']}: median {t['median'] if t['median'] is None else round(t['median'], 3)}"
                     f" -> {'met' if t['met'] else 'NOT met' if t['met'] is False else 'n/a'}"
                     for k, t in rat["targets"].items()]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.kd_throughput_report RESULT.json [--plot]: re-derive, rewrite
    import json
    import sys

    path = Path(sys.argv[1])
    res = json.loads(path.read_text())
    res["summary"], res["ratios"] = summarize(res["runs"]), ratios(res["runs"])
    bl.write_json(path, res)
    if "--plot" in sys.argv:
        plot(res, path.with_suffix(".png"))
    print(as_table(res))
