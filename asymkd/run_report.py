"""The report of `asymkd run`: the table, the comparison the regime calls for, and the held-out curve plot.

    print(format_table(rows, teacher_ce))
    comparison = equal_budget_line(rows, "cache", train)    # {"text": ..., "kd": ..., "ce": ..., ...}
    plot_curves(rows, out / "comparison.png", title=...)      # held-out CE against wall-clock; None without matplotlib

A row is one student: its summary (summary.json) plus `wall_s` (the process), `teacher_s` (the teacher's own
time charged to it), `clock_s` (teacher_s + its training loop: what an equal-wall-clock comparison equalizes)
and `curve` [(training-loop seconds, held-out CE), ...].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("asymkd.student.run")
COLUMNS = ("student", "held-out CE", "steps", "wall s", "samples/s", "teacher s", "clock s")


def format_table(rows: list[dict[str, Any]], teacher_ce: float | None) -> str:
    widths = (16, 12, 7, 8, 11, 11, 9)
    head = "".join(
        f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths, strict=True))
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ce = r.get("eval_loss")
        cells = [
            f"{r['name']:<16}", f"{'-' if ce is None else f'{ce:.4f}':>12}", f"{r['step']:>7}",
            f"{r['wall_s']:>8.1f}", f"{r['samples_per_s']:>11.2f}", f"{r['teacher_s']:>11.1f}", f"{r['clock_s']:>9.1f}",
        ]  # fmt: skip
        lines.append("".join(cells))
    if teacher_ce is not None:
        lines.append(f"{'teacher':<16}{teacher_ce:>12.4f}   (the teacher's own CE on the same held-out rows)")
    lines.append("clock s = the teacher's own time charged to the student + its training loop")
    return "\n".join(lines)


def equal_budget_line(rows: list[dict[str, Any]], regime: str, epochs: float | None = None) -> dict[str, Any]:
    """The comparison of the regime: equal steps (live) or equal wall-clock (cache), in numbers and one line."""
    kd, ce = rows
    gain = 100.0 * (ce["eval_loss"] - kd["eval_loss"]) / ce["eval_loss"]
    if regime == "cache":
        how = (
            f"equal wall-clock ({kd['clock_s']:.0f} s for KD, all of the teacher's time included, vs "
            f"{ce['clock_s']:.0f} s of CE-only training)"
        )
        seen = f", seen ~{epochs:.1f} times by KD" if epochs else ""
        where = f"data-limited regime: the teacher scored the training rows once into an offline cache{seen}"
    else:
        how = f"equal steps ({kd['step']} vs {ce['step']})"
        where = "live regime: the teacher scored each batch while the student trained"
    better = "lower" if gain > 0 else "higher"
    best_ce = min((v for _, v in ce["curve"]), default=ce["eval_loss"])  # CE with early stopping, for honesty
    best_gain = 100.0 * (best_ce - kd["eval_loss"]) / best_ce
    text = (
        f"{where}; at {how}: held-out CE {kd['eval_loss']:.4f} (KD) vs {ce['eval_loss']:.4f} (CE only), "
        f"{abs(gain):.1f}% {better} with distillation; against CE-only's best evaluation of the run "
        f"({best_ce:.4f}, as if stopped early) {abs(best_gain):.1f}% {'lower' if best_gain > 0 else 'higher'}"
    )
    out = {"basis": "equal_wall_clock" if regime == "cache" else "equal_steps", "kd": kd["eval_loss"]}
    out |= {"ce": ce["eval_loss"], "relative_reduction_pct": gain, "ce_best": best_ce}
    out |= {"relative_reduction_vs_best_pct": best_gain, "text": text}
    if epochs is not None:
        out["epochs"] = epochs
    return out


def plot_curves(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Held-out CE against wall-clock (the teacher's charged time first, then the training loop)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        if not r["curve"]:
            continue
        xs = [r["teacher_s"] + t for t, _ in r["curve"]]
        ax.plot(xs, [ce for _, ce in r["curve"]], marker="o", label=f"{r['name']} ({r['eval_loss']:.3f})")
        if r["teacher_s"] > 0:
            ax.axvspan(0, r["teacher_s"], alpha=0.12, label="teacher time (charged to KD)")
    ax.set_xlabel("wall-clock seconds (teacher's charged time + training loop)")
    ax.set_ylabel("held-out CE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
