"""Numbers and the plot of bench/quality.py: held-out CE and KL(teacher ‖ student), deltas, the PNG."""

from __future__ import annotations

from pathlib import Path


def score_heldout(
    teacher_dir: Path, students: dict[str, Path], rows, batch_size: int = 4, max_rows: int = 96
) -> dict:
    """Mean per target token over the first `max_rows` held-out rows (the trainer's loss mask): each
    student's CE against the true next token and KL(teacher ‖ student) over the full vocabulary; the
    teacher's own CE."""
    import torch
    from transformers import AutoModelForCausalLM

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    teacher = load(teacher_dir)
    models = {name: load(path) for name, path in students.items()}
    sums = {name: torch.zeros(2, dtype=torch.float64) for name in ["teacher", *models]}
    n_tokens = 0
    with torch.inference_mode():
        for i in range(0, min(len(rows), max_rows), batch_size):
            end = min(i + batch_size, max_rows)
            ids = torch.from_numpy(rows.tokens[i:end].astype("int64"))
            mask = torch.from_numpy(rows.mask[i:end])
            targets = ids[:, 1:][mask].unsqueeze(-1)
            t_lp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1][mask].float(), -1)
            sums["teacher"][0] += -t_lp.gather(-1, targets).sum().item()
            p = t_lp.exp()
            for name, model in models.items():
                s_lp = torch.log_softmax(model(input_ids=ids).logits[:, :-1][mask].float(), -1)
                sums[name][0] += -s_lp.gather(-1, targets).sum().item()
                sums[name][1] += (p * (t_lp - s_lp)).sum().item()
            n_tokens += int(mask.sum())
    out = {
        name: {"ce": float(s[0]) / n_tokens, "kl_teacher_student": float(s[1]) / n_tokens}
        for name, s in sums.items()
    }
    out["teacher"].pop("kl_teacher_student")
    return out | {"tokens": n_tokens, "rows": min(len(rows), max_rows)}


def _delta(kd: float, base: float) -> dict:
    return {"kd": kd, "baseline": base, "relative_reduction_pct": 100.0 * (base - kd) / base}


def comparisons(heldout: dict, signals: list[str]) -> dict:
    """Relative reduction of held-out CE (and KL) of each KD student vs CE-only: equal steps (`ce`) and
    equal training clock (`ce_wall`, when it ran)."""
    out = {}
    for s in signals:
        kd = heldout[f"kd_{s}"]
        for base_name, label in (("ce", "equal_steps"), ("ce_wall", "equal_wall_clock")):
            if base_name in heldout:
                base = heldout[base_name]
                out[f"{label}: kd_{s} vs {base_name} (held-out CE)"] = _delta(kd["ce"], base["ce"])
                out[f"{label}: kd_{s} vs {base_name} (KL to teacher)"] = _delta(
                    kd["kl_teacher_student"], base["kl_teacher_student"]
                )
    return out


_COLORS = {"ce": "#555555", "ce_wall": "#555555", "kd_top_k": "#1f77b4", "kd_full": "#9467bd"}


def _curves(result: dict) -> dict[str, list[dict]]:
    """CE-only as one curve (ce, then its continuation ce_wall), one per KD run."""
    runs = result["runs"]
    curves = {"CE only": runs["ce"]["curve"] + runs.get("ce_wall", {}).get("curve", [])}
    curves |= {f"KD {k[3:]}": v["curve"] for k, v in runs.items() if k.startswith("kd_")}
    return curves


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"CE only": "#555555", "KD top_k": "#1f77b4", "KD full": "#9467bd"}
    n_steps = result["config"]["steps_N"]
    for label, pts in _curves(result).items():
        axes[0].plot([p["step"] for p in pts], [p["eval_loss"] for p in pts], "o-", ms=3, label=label,
                     color=colors.get(label))  # fmt: skip
        axes[1].plot([p["clock_s"] / 60 for p in pts], [p["eval_loss"] for p in pts], "o-", ms=3, label=label,
                     color=colors.get(label))  # fmt: skip
    axes[0].axvline(n_steps, color="#aaaaaa", ls="--", lw=1)
    axes[0].text(n_steps, axes[0].get_ylim()[1], " N (equal steps)", va="top", fontsize=8)
    kd_clock = result["runs"][f"kd_{result['config']['signals'][0]}"]["train_clock_s"] / 60
    axes[1].axvline(kd_clock, color="#aaaaaa", ls="--", lw=1)
    axes[1].text(kd_clock, axes[1].get_ylim()[1], " KD's clock", va="top", fontsize=8)
    axes[0].set(xlabel="optimizer step", ylabel="held-out CE (nats/token, in-run eval)", title="Equal steps")
    axes[1].set(xlabel="training clock (min)", ylabel="held-out CE (nats/token, in-run eval)",
                title="Equal wall-clock")  # fmt: skip
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _bars(axes[2], result)
    mach, cfg = result["machine"], result["config"]
    fig.suptitle(
        f"KD vs CE-only — teacher SmolLM2-135M-Instruct → student {cfg['student_params_m']:.0f}M, "
        f"N={cfg['steps_N']}, M={cfg['steps_M']} — {mach['cpu_count']} cores, load {mach['load_average_1_5_15'][0]}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, result: dict) -> None:
    held = result["heldout"]
    names = [n for n in held if n not in ("teacher", "tokens", "rows")]
    labels = [f"{n}\n({result['runs'][n]['steps']} steps)" for n in names]
    x = range(len(names))
    w = 0.38
    ce = [held[n]["ce"] for n in names]
    kl = [held[n]["kl_teacher_student"] for n in names]
    ax.bar([i - w / 2 for i in x], ce, w, label="held-out CE", color=[_COLORS.get(n, "#999") for n in names])
    ax.bar([i + w / 2 for i in x], kl, w, label="KL(teacher‖student)", color="#dddddd", edgecolor="#888888")
    for i in x:
        ax.text(i - w / 2, ce[i], f"{ce[i]:.3f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + w / 2, kl[i], f"{kl[i]:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(
        held["teacher"]["ce"], color="#d62728", ls=":", lw=1, label=f"teacher CE {held['teacher']['ce']:.2f}"
    )
    ax.set_xticks(list(x), labels, fontsize=8)
    title = f"Final students ({held['rows']} held-out rows, {held['tokens']:,} tokens)"
    ax.set(ylabel="nats/token (held-out, full vocabulary)", title=title)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max(ce + kl) * 1.4)


def as_table(result: dict) -> str:
    """Markdown table of the final held-out numbers (for RESULTS.md)."""
    held, runs = result["heldout"], result["runs"]
    lines = [
        "| student | steps | training clock | held-out CE | KL(teacher‖student) |",
        "|---|---|---|---|---|",
    ]
    for n in (k for k in held if k not in ("teacher", "tokens", "rows")):
        r = runs[n]
        lines.append(
            f"| {n} | {r['steps']} | {r['train_clock_s'] / 60:.1f} min | {held[n]['ce']:.4f} | "
            f"{held[n]['kl_teacher_student']:.4f} |"
        )
    lines.append(f"| teacher (SmolLM2-135M-Instruct) | — | — | {held['teacher']['ce']:.4f} | 0 |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    res = json.loads(Path(sys.argv[1]).read_text())
    print(as_table(res))
    for k, v in res["comparisons"].items():
        print(f"- {k}: {v['relative_reduction_pct']:+.2f}% ({v['baseline']:.4f} → {v['kd']:.4f})")
