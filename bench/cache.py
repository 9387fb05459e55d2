"""The offline teacher cache per encoding: bytes per token, write throughput, the trainer's step time reading
it (vs CE-only, same run) and held-out CE after a fixed run (vs the lossless cache).

    python bench/cache.py              # SmolLM2-135M-Instruct teacher -> the demo's ~7M student, ~15 min on 2 cores
    python bench/cache.py --quick      # smoke run (tiny corpus, few steps)

The demo pair and regime (examples/demo.yaml): the embedded default teacher (bf16, served by a LocalTeacher)
and a random-init Llama with its tokenizer, on `--train-docs` documents of the builtin stdlib-docs corpus
(the data-limited regime, several epochs), held-out documents fixed. Everything runs through the product:

1. `asymkd cache write --encoding delta-fp32` through the teacher server: the lossless cache, every training
   row scored once (its throughput is the teacher's). Each other encoding is written from it
   (`--teacher.cache`, no teacher: the throughput of reading + encoding alone). Bytes per token = shard and
   vocabulary files / scored tokens.
2. `asymkd train` for `--steps` steps per variant (CE only; KD from each `--train` encoding), in one order,
   then a timing pass of `--timing-steps` steps in the reverse order (A/B then B/A: load from other processes
   hits them alike). Step time = the median of the trainer's own per-step clock after warm-up (a step stalled
   by another process on shared cores does not move it; the mean is kept too); read time = the median of the
   source's wait per step (decoding the rows from the memory-mapped shards). Held-out CE: the trainer's final
   evaluation over every held-out row.

Goals (the issue): <= 120 B/token for top-64 + tail with held-out CE within 0.5% of the lossless cache;
reading adds < 2% to the training step. Writes bench/results/cache.json and cache.png; run folders under
$ASYMKD_CACHE/bench/runs/cache*/.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/cache.py` from the repo root

from bench import benchlib as bl
from bench.quality import data_section, eval_rows
from bench.runner import Placement, run_train, start_teacher, tail, write_cache

log = logging.getLogger("bench.cache")
ALL = ("packed-fp32", "packed-bf16", "packed-fp16", "packed-q8", "packed-q4",
       "delta-fp32", "delta-bf16", "delta-fp16", "delta-q8", "delta-q4")  # fmt: skip
LOSSLESS = "delta-fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny corpus and student, 20 steps")
    p.add_argument("--train-docs", type=int, default=250, help="training documents (the demo's 250)")
    p.add_argument(
        "--steps", type=int, default=300, help="optimizer steps per variant (held-out CE after them)"
    )
    p.add_argument(
        "--timing-steps", type=int, default=60, help="steps per variant of the reversed timing pass"
    )
    p.add_argument("--train", nargs="+", default=["delta-fp32", "delta-bf16", "delta-q8", "delta-q4", "packed-q4"],
                   choices=ALL, help="encodings a student trains from")  # fmt: skip
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=1.5)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/cache.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_docs, args.steps, args.timing_steps = 40, 20, 10
        args.hidden_size, args.num_layers, args.train = 64, 2, ["delta-fp32", "delta-q4"]
    if LOSSLESS not in args.train:
        args.train.insert(0, LOSSLESS)
    args.out = args.out or (
        bl.cache_root() / "cache_quick.json" if args.quick else bl.RESULTS_DIR / "cache.json"
    )
    return args


def train_config(args, teacher_dir: Path, data: dict, eval_batches: int) -> dict:
    return {
        "model": {"tokenizer": str(teacher_dir), "hidden_size": args.hidden_size, "num_layers": args.num_layers,
                  "num_heads": max(1, args.hidden_size // 64), "tie_word_embeddings": True,
                  "max_position_embeddings": max(256, args.seq_len)},
        "data": data,
        "optim": {"lr": args.lr, "warmup_steps": min(20, args.steps // 5), "schedule": "constant",
                  "micro_batch_size": args.batch_size},
        "parallel": {"device": "cpu"},
        "distill": {"signal": "top_k", "top_k": args.top_k, "loss": "forward_kl", "kd_weight": 1.0, "ce_weight": 0.0},
        "teacher": {"prefetch": 4, "timeout_s": 900.0},
        "checkpoint": {"export": False},
        "metrics": {"log_every": 50},
        "run": {"steps": args.steps, "seed": args.seed, "eval_batches": eval_batches},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ caches
def write_all(args, cfg: dict, teacher_dir: Path, work: Path) -> dict:
    """The lossless cache through the teacher, then every encoding from it; {encoding: figures}."""
    shared, out = Placement.shared(), {}
    with start_teacher(teacher_dir, "hf", shared, work / "teacher.log", dtype="bfloat16",
                       extra_args=["--max-top-k", str(args.top_k)]) as teacher:  # fmt: skip
        out[LOSSLESS] = _write(cfg, work, LOSSLESS, shared, teacher=teacher)
    for enc in ALL:
        if enc != LOSSLESS:
            source = {**cfg, "teacher": {**cfg["teacher"], "cache": str(work / "caches" / LOSSLESS)}}
            out[enc] = _write(source, work, enc, shared, teacher=None)
    return out


def _write(cfg: dict, work: Path, encoding: str, placement: Placement, *, teacher) -> dict:
    folder = work / "caches" / encoding
    wall = write_cache({**cfg, "encoding": encoding}, work / "writes" / encoding, folder, placement=placement,
                       teacher=teacher)  # fmt: skip
    m = json.loads((folder / "manifest.json").read_text())
    data_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".safetensors")
    res = {
        "bytes_per_token": data_bytes / m["tokens"], "bytes_on_disk": m["bytes_on_disk"], "tokens": m["tokens"],
        "rows": m["rows"], "write_s": m["writer"]["seconds"], "write_tokens_per_s": m["tokens"] / m["writer"]["seconds"],
        "process_wall_s": wall, "written_from": "teacher server" if teacher is not None else "the lossless cache",
    }  # fmt: skip
    log.info("%-12s %6.1f B/token  %8.0f tok/s written (%s)", encoding, res["bytes_per_token"],
             res["write_tokens_per_s"], res["written_from"])  # fmt: skip
    return res


# -------------------------------------------------------------------------------------------------- train
def variant_config(cfg: dict, name: str, work: Path, steps: int) -> dict:
    out = {**cfg, "run": {**cfg["run"], "steps": steps}}
    if name != "ce":
        out["teacher"] = {**cfg["teacher"], "cache": str(work / "caches" / name)}
    return out


def train_once(cfg: dict, name: str, out: Path, warmup: int) -> dict:
    res = run_train(cfg, out, placement=Placement.shared(), warmup_steps=warmup)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: asymkd train failed ({res.returncode}):\n{tail(res.log_path)}")
    recs = res.train_records[warmup:]
    steps = [r["step_time_s"] for r in recs]
    read_ms = [r.get("teacher_wait_ms") or 0.0 for r in recs]
    final_eval = res.eval_records[-1]["eval_loss"] if res.eval_records else None
    return {  # medians: a step stalled by another process on the shared cores does not move them
        "step_s": statistics.median(steps), "step_s_mean": res.step_s_mean,
        "read_ms_per_step": statistics.median(read_ms), "read_ms_per_step_mean": statistics.mean(read_ms),
        "heldout_ce": final_eval, "final_train_loss": res.final.get("loss"), "steps": res.steps,
        "load_average_1m_after": round(bl.load_average_1m(), 2),
    }  # fmt: skip


def train_all(args, cfg: dict, work: Path) -> dict:
    names = ["ce", *args.train]
    runs: dict[str, dict] = {n: {} for n in names}
    for name in names:  # pass 1: the fixed run (held-out CE), in order
        runs[name]["run"] = train_once(
            variant_config(cfg, name, work, args.steps), name, work / "train" / name, 5
        )
        log.info("%-12s held-out CE %.4f  step %.3f s  read %.2f ms/step", name, runs[name]["run"]["heldout_ce"],
                 runs[name]["run"]["step_s"], runs[name]["run"]["read_ms_per_step"])  # fmt: skip
    for name in reversed(names):  # pass 2: timing only, reversed order
        timing_cfg = variant_config(cfg, name, work, args.timing_steps)
        timing_cfg["data"] = {k: v for k, v in timing_cfg["data"].items() if k != "eval_path"}
        timing_cfg["data"]["eval_fraction"] = 0.0
        runs[name]["timing"] = train_once(timing_cfg, name, work / "timing" / name, 5)
    return runs


def summarize(runs: dict, writes: dict) -> dict:
    ce_step = statistics.median([runs["ce"]["run"]["step_s"], runs["ce"]["timing"]["step_s"]])
    base = runs[LOSSLESS]["run"]["heldout_ce"]
    out = {}
    for name, r in runs.items():
        step = statistics.median([r["run"]["step_s"], r["timing"]["step_s"]])
        read_ms = statistics.median([r["run"]["read_ms_per_step"], r["timing"]["read_ms_per_step"]])
        out[name] = {
            "heldout_ce": r["run"]["heldout_ce"], "step_s": step, "step_vs_ce_only": step / ce_step,
            "read_ms_per_step": read_ms, "read_share_of_step_pct": 100 * read_ms / 1e3 / step,
        }  # fmt: skip
        if name != "ce":
            out[name]["heldout_ce_vs_lossless_pct"] = 100 * (r["run"]["heldout_ce"] - base) / base
            out[name]["bytes_per_token"] = writes[name]["bytes_per_token"]
    return out


def goals(summary: dict, writes: dict) -> dict:
    fits = [n for n, w in writes.items() if w["bytes_per_token"] <= 120]
    good = [n for n in fits if n in summary and abs(summary[n]["heldout_ce_vs_lossless_pct"]) <= 0.5]
    reads = {n: s["read_share_of_step_pct"] for n, s in summary.items() if n != "ce"}
    return {
        "encodings_within_120_B_per_token": fits,
        "within_120_B_and_heldout_ce_within_0.5pct": good,
        "read_share_of_step_pct": reads, "read_under_2pct": {n: v < 2.0 for n, v in reads.items()},
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------- output
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    writes, summary = result["encodings"], result["training"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    names = list(writes)
    axes[0].barh(names, [writes[n]["bytes_per_token"] for n in names], color="#1f77b4")
    axes[0].axvline(120, color="#d62728", ls="--", lw=1, label="goal 120 B")
    axes[0].axvline(525, color="#999999", ls=":", lw=1, label="format 1 (~525 B)")
    axes[0].set(xlabel="bytes per scored token (top-64 + tail)", title="Size")
    trained = [n for n in summary if n != "ce"]
    axes[1].bar(trained, [summary[n]["heldout_ce_vs_lossless_pct"] for n in trained], color="#2ca02c")
    axes[1].axhspan(-0.5, 0.5, color="#dddddd", label="±0.5% goal")
    axes[1].set(
        ylabel="held-out CE vs the lossless cache (%)", title=f"After {result['config']['steps']} steps"
    )
    axes[2].bar(list(summary), [summary[n]["step_s"] * 1e3 for n in summary], color="#9467bd", label="step")
    axes[2].bar(
        list(summary), [summary[n]["read_ms_per_step"] for n in summary], color="#ff7f0e", label="read"
    )
    axes[2].set(ylabel="ms per optimizer step (median of 2 passes)", title="Step time: reading vs CE-only")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[1:]:
        ax.tick_params(axis="x", rotation=30)
    mach = result["machine"]
    fig.suptitle(f"Offline teacher cache per encoding — {mach['cpu_count']} cores, load "
                 f"{mach['load_average_1m_at_start']} → {mach['load_average_1m_at_end']}", fontsize=10)  # fmt: skip
    bl.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from teacher_server.models import default_teacher_dir

    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    t0 = time.perf_counter()
    teacher_dir = default_teacher_dir()
    work = bl.cache_root() / "runs" / ("cache-quick" if args.quick else "cache")
    data = data_section(args)
    held = eval_rows(data, teacher_dir)
    eval_batches = max(1, len(held["eval"]) // args.batch_size)
    cfg = train_config(args, teacher_dir, data, eval_batches)
    writes = write_all(args, cfg, teacher_dir, work)
    runs = train_all(args, cfg, work)
    summary = summarize(runs, writes)
    result = {
        "benchmark": "cache",
        "command": "python bench/cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": bl.machine_info() | {"load_average_1m_at_start": round(load0, 2)},
        "config": {"teacher": teacher_dir.name, "train_docs": args.train_docs, "train_rows": held["train_rows"],
                   "heldout_rows": len(held["eval"]), "steps": args.steps, "timing_steps": args.timing_steps,
                   "top_k": args.top_k, "trainer_config": cfg},
        "encodings": writes, "training": summary, "runs": runs, "goals": goals(summary, writes),
        "bench_wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    result["machine"]["load_average_1m_at_end"] = round(bl.load_average_1m(), 2)
    bl.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    for k, v in result["goals"].items():
        log.info("%-45s %s", k, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
