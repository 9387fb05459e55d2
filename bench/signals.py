"""Every teacher signal on the demo pair: bytes on the wire, teacher time, student step time, trainer memory,
held-out CE after a fixed number of steps; and the torch data plane against chunked gRPC.

    python bench/signals.py                 # SmolLM2-135M -> ~17M student, 60 steps per signal, 2 repeats
    python bench/signals.py --quick         # smoke run: tiny random pair, 4 steps, 1 repeat (~3 min)
    python bench/signals.py --variants top_k64 hidden_grpc full_grpc

Variants (all `asymkd train` against a real teacher server, hf backend, fp32, forward KL at T = 1, the same
student init, data, order and seed): top_k8 / top_k64 (+ the exact tail bucket), sampled12 (RS-KD, 12
draws), at_ids64 (the teacher at the student's own top-64 + tail: a student forward before every teacher
request, no prefetch), hidden (the student applies the teacher's output layer) and full, each over gRPC and
over the torch data plane (`teacher.data_plane: torch`, a gloo pair per rank). Ids travel packed.

Two phases, each writing into one JSON:
1. wire: the first `--wire-batches` training batches, each sent exactly as the trainer's feed builds it, one
   at a time with nothing else running: bytes per scored token on the wire (gRPC messages + data-plane
   tensors), the teacher's time (request -> usable tensors), and for full / hidden the transport rate: gRPC =
   bytes after the first message / (first message -> decoded tensors), torch = tensor bytes / fetch time.
2. train: one run per variant and repeat (a fresh teacher server each, so its peak memory is its own), the
   order reversed on odd repeats (A/B alternated): samples/s and step time after the warm-up steps, the
   student's wait for the teacher, trainer / teacher peak RSS, and the held-out CE at the last step.
The 1-min load average is recorded at start, after every run and at the end. Goals checked in `goals`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/signals.py` from the repo root

from bench import benchlib as bl
from bench.runner import Placement, run_train, start_teacher, tail

log = logging.getLogger("bench.signals")


@dataclass(frozen=True)
class Variant:
    name: str
    signal: str
    plane: str = "grpc"
    top_k: int = 0
    num_samples: int = 0
    trained: bool = True  # False: wire phase only

    def distill(self) -> dict:
        out = {"signal": self.signal}
        return (
            out
            | ({"top_k": self.top_k} if self.top_k else {})
            | ({"num_samples": self.num_samples} if self.num_samples else {})
        )


VARIANTS = [
    Variant("top_k8", "top_k", top_k=8),
    Variant("top_k64", "top_k", top_k=64),
    Variant("top_k64_int32_ids", "top_k", top_k=64, trained=False),
    Variant("sampled12", "sampled", num_samples=12),
    Variant("at_ids64", "at_ids", top_k=64),
    Variant("hidden_grpc", "hidden"),
    Variant("hidden_torch", "hidden", plane="torch"),
    Variant("full_grpc", "full"),
    Variant("full_torch", "full", plane="torch"),
]


# --------------------------------------------------------------------------------------------- wire phase
def wire_pass(address: str, v: Variant, batches: list[dict], student_vocab: int) -> dict:
    """Bytes and times of the trainer's requests for `v`, one batch at a time (see the module docstring)."""
    import grpc
    import torch

    from asymkd.contract import IdEncoding
    from asymkd.remote import fill_remote
    from asymkd.v1 import teacher_pb2_grpc
    from asymkd.wire import ScoreAssembly, expected_rows
    from student_trainer.config import DistillSection
    from student_trainer.sources.data_plane import DataPlaneClient
    from student_trainer.sources.signals import build_query, id_encoding
    from teacher_server.client import TeacherClient

    distill = DistillSection(**v.distill(), pack_ids=not v.name.endswith("int32_ids"))
    opts = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    client = TeacherClient([address], timeout_s=600)
    stub = teacher_pb2_grpc.TeacherStub(grpc.insecure_channel(address, options=opts))
    info = client.info()
    encoding = id_encoding(info, distill) if distill.pack_ids else IdEncoding.INT32_IDS
    plane = DataPlaneClient(client.open_data_plane("gloo"), "127.0.0.1") if v.plane == "torch" else None
    gen = torch.Generator().manual_seed(0)
    out = {"rows": [], "bytes": [], "teacher_ms": [], "transport_mb_s": [], "grpc_bytes": []}
    try:
        for i, batch in enumerate(batches):
            at = torch.randint(0, student_vocab, (*batch["loss_mask"].shape, v.top_k), generator=gen)
            query = build_query(batch, distill, v.top_k or 64, encoding=encoding,
                                at_ids=at if v.signal == "at_ids" else None,
                                session=plane.offer.session if plane else "")  # fmt: skip
            req = query.to_proto(f"w{i}")
            t0 = time.perf_counter()
            msgs, arrived = [], []
            for msg in stub.ScoreStream(iter([req]), timeout=600):
                msgs.append(msg)
                arrived.append(time.perf_counter())
            asm = ScoreAssembly(expected_rows(req))
            for msg in msgs:
                asm.add(msg)
            results = asm.results()
            t_decoded = time.perf_counter()
            plane_bytes = 0
            for ref in asm.remote:
                t = plane.fetch(ref)
                fill_remote(results, ref, t, asm.rows)
                plane_bytes += t.numel() * t.element_size()
            t_end = time.perf_counter()
            grpc_bytes = sum(m.ByteSize() for m in msgs)
            out["rows"].append(sum(asm.rows))
            out["grpc_bytes"].append(grpc_bytes)
            out["bytes"].append(grpc_bytes + plane_bytes)
            out["teacher_ms"].append((t_end - t0) * 1e3)
            if plane_bytes:
                out["transport_mb_s"].append(plane_bytes / 1e6 / (t_end - t_decoded))
            elif len(msgs) > 1 and v.signal in ("full", "hidden"):
                after_first = grpc_bytes - msgs[0].ByteSize()
                out["transport_mb_s"].append(after_first / 1e6 / (t_decoded - arrived[0]))
    finally:
        if plane is not None:
            plane.close()
        client.close()
    skip = 1 if len(batches) > 1 else 0  # the first request warms the server up
    rows = sum(out["rows"][skip:])
    return {
        "bytes_per_token": sum(out["bytes"][skip:]) / rows,
        "grpc_message_bytes_per_token": sum(out["grpc_bytes"][skip:]) / rows,
        "teacher_ms": bl.summarize(out["teacher_ms"][skip:]),
        "transport_mb_s": bl.summarize(out["transport_mb_s"][skip:]),
        "id_encoding": encoding.name, "batches": len(batches), "first_left_out": skip, "tokens": rows,
    }  # fmt: skip


def student_params_m(args, vocab: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h = args.hidden_size
    config = LlamaConfig(vocab_size=vocab, hidden_size=h, num_hidden_layers=args.num_layers,
                         num_attention_heads=max(h // 64, 1), intermediate_size=4 * h,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6


# --------------------------------------------------------------------------------------------- train phase
def base_config(args, student_tok: Path) -> dict:
    h = args.hidden_size
    return {
        "model": {"tokenizer": str(student_tok), "hidden_size": h, "num_layers": args.num_layers,
                  "num_heads": max(h // 64, 1), "intermediate_size": 4 * h, "tie_word_embeddings": True,
                  "max_position_embeddings": max(512, args.seq_len)},
        "data": {"builtin": "stdlib-docs", "seq_len": args.seq_len, "eval_fraction": 0.1},
        "optim": {"lr": 1e-3, "warmup_steps": min(10, args.steps // 4), "schedule": "constant",
                  "micro_batch_size": args.batch_size},
        "parallel": {"device": "cpu"},
        "distill": {"loss": "forward_kl", "temperature": 1.0, "kd_weight": 1.0, "ce_weight": 0.0},
        "teacher": {"prefetch": args.prefetch, "timeout_s": 900.0},
        "checkpoint": {"export": False},
        "metrics": {"log_every": 10},
        "run": {"steps": args.steps, "seed": args.seed, "eval_batches": args.eval_batches},
    }  # fmt: skip


def train_run(v: Variant | None, args, teacher_dir: Path, work: Path, repeat: int) -> dict:
    cfg = base_config(args, teacher_dir)
    out = work / f"r{repeat}" / (v.name if v else "ce_only")
    out.mkdir(parents=True, exist_ok=True)
    shared = Placement.shared()
    if v is None:
        res = run_train(cfg, out, placement=shared, warmup_steps=args.warmup_steps)
    else:
        cfg["distill"] |= v.distill()
        cfg["teacher"]["data_plane"] = v.plane
        serve = ["--device", "cpu", "--max-top-k", "256"]
        with start_teacher(
            teacher_dir, "hf", shared, out / "teacher.log", dtype="float32", extra_args=serve
        ) as t:
            res = run_train(cfg, out, placement=shared, teacher=t, warmup_steps=args.warmup_steps)
    if res.returncode != 0 or res.samples_per_s is None:
        raise RuntimeError(f"{out.name}: asymkd train failed ({res.returncode}):\n{tail(res.log_path)}")
    evals = sorted(res.eval_records, key=lambda r: r["step"])
    row = res.summary() | {
        "name": v.name if v else "ce_only",
        "repeat": repeat,
        "load_average_1m": round(bl.load_average_1m(), 2),
    }
    row["heldout_ce"] = evals[-1]["eval_loss"] if evals else None
    row["train_losses"] = [r["loss"] for r in res.train_records]
    log.info("r%d %-16s %5.2f samples/s  step %.2f s  trainer %.0f MB  held-out CE %.4f", repeat,
             row["name"], row["samples_per_s"], row["step_s_mean"], row["trainer_peak_mb"],
             row["heldout_ce"] or float("nan"))  # fmt: skip
    return row


# ------------------------------------------------------------------------------------------------ results
def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        rs = [r for r in rows if r["name"] == name]
        keys = (
            "samples_per_s",
            "step_s_mean",
            "teacher_wait_ms_mean",
            "trainer_peak_mb",
            "teacher_peak_mb",
            "heldout_ce",
        )
        out[name] = {k: bl.summarize([r.get(k) for r in rs]) for k in keys}
    return out


def goals(summary: dict, runs: list[dict], wire: dict) -> dict:
    def ce(n):
        return (summary.get(n) or {}).get("heldout_ce", {}).get("median")

    def first(n):
        return next((r["train_losses"] for r in runs if r["name"] == n), None)

    out = {}
    full = first("full_grpc")
    for n in ("hidden_grpc", "hidden_torch", "full_torch"):
        if full and first(n):
            diff = max(abs(a - b) for a, b in zip(first(n), full, strict=True))
            out[f"{n} per-step losses == full_grpc"] = {"max_abs_diff": diff, "met": diff <= 1e-4}
    for n in ("top_k64", "sampled12", "top_k8", "at_ids64"):
        if ce(n) and ce("full_grpc"):
            rel = ce(n) / ce("full_grpc") - 1
            out[f"{n} held-out CE within 1% of full"] = {"rel_diff": rel, "met": abs(rel) <= 0.01}
    for sig in ("full", "hidden"):
        g, t = (wire.get(f"{sig}_{p}", {}).get("transport_mb_s", {}).get("median") for p in ("grpc", "torch"))
        if g and t:
            out[f"{sig}: torch data plane bytes/s >= 3x chunked gRPC"] = {"ratio": t / g, "met": t / g >= 3}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wire, summ = result["wire"], result["summary"]

    def median(section: dict, key: str, scale: float = 1.0) -> dict:
        return {n: v[key]["median"] / scale for n, v in section.items() if v[key]["n"]}

    panels = [
        (
            "bytes per scored token on the wire (log)",
            {n: w["bytes_per_token"] for n, w in wire.items()},
            True,
        ),
        ("teacher time per batch, ms (request -> tensors)", median(wire, "teacher_ms"), False),
        ("full / hidden rows: transport MB/s", median(wire, "transport_mb_s"), False),
        ("student step time, s", median(summ, "step_s_mean"), False),
        ("trainer peak RSS, GiB", median(summ, "trainer_peak_mb", 1024), False),
        ("held-out CE after the last step", median(summ, "heldout_ce"), False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.8))
    for ax, (title, vals, logx) in zip(axes, panels, strict=True):
        names = list(vals)
        ax.barh(
            range(len(names)),
            [vals[n] for n in names],
            color=["#9467bd" if "full" in n or "hidden" in n else "#1f77b4" for n in names],
        )
        for i, n in enumerate(names):
            ax.text(vals[n], i, f" {vals[n]:.4g}", va="center", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        if logx:
            ax.set_xscale("log")
        if title.startswith("held-out"):
            lo = min(vals.values())
            ax.set_xlim(lo * 0.98, max(vals.values()) * 1.01)
    m, c = result["machine"], result["config"]
    fig.suptitle(f"signals — {c['teacher']} -> {c['student_params_m']:.0f}M student, {c['steps']} steps, "
                 f"batch {c['batch_size']}x{c['seq_len']} — {m['cpu_count']} cores, "
                 f"load at start {m['load_average_1m_at_start']}", fontsize=10)  # fmt: skip
    bl.save_figure(fig, path)


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random teacher, 4 steps, 1 repeat")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {[v.name for v in VARIANTS]}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; quick 4)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="first steps left out of samples/s (default 3)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="train phase repeats, A/B alternated (default 2)"
    )
    p.add_argument("--wire-batches", type=int, default=None, help="batches in the wire phase (default 6)")
    p.add_argument("--no-train", action="store_true", help="the wire phase only")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden-size", type=int, default=256, help="student width (4 layers: ~17M params)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=1.5, help="warn when the 1-min load average is above")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/signals.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (4 if q else 60)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if q else 3)
    args.repeats = args.repeats or (1 if q else 2)
    args.wire_batches = args.wire_batches or (2 if q else 6)
    if q:
        args.seq_len, args.hidden_size, args.num_layers, args.eval_batches = 64, 64, 2, 2
    known = {v.name: v for v in VARIANTS}
    bad = [n for n in args.variants or [] if n not in known]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(known)}")
    args.chosen = [known[n] for n in args.variants] if args.variants else VARIANTS
    args.out = args.out or (bl.cache_root() / "signals_quick.json" if q else bl.RESULTS_DIR / "signals.json")
    return args


def teacher_folder(quick: bool) -> Path:
    if not quick:
        from teacher_server.models import default_teacher_dir

        return default_teacher_dir()
    return bl.build_model(
        bl.cache_root() / "models" / "signals-quick-teacher", bl.LlamaShape(128, 2, 2, 384), seed=1
    )


def training_batches(teacher_dir: Path, args, n: int) -> list[dict]:
    """The first `n` micro-batches `asymkd train` trains on (its data pipeline, its seeded order)."""
    from transformers import AutoTokenizer

    from asymkd.contract import tokenizer_hash
    from student_trainer.config import DataSection
    from student_trainer.data import PackedDataset, load_packs

    data = DataSection(builtin="stdlib-docs", seq_len=args.seq_len, eval_fraction=0.1)
    packs = load_packs(
        data, AutoTokenizer.from_pretrained(teacher_dir), tokenizer_hash(teacher_dir) or str(teacher_dir)
    )
    ds = PackedDataset(packs["train"], micro_batch_size=args.batch_size, seed=args.seed, shuffle=True)
    return [ds.batch(i) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load0 = bl.begin(args.max_load, log)
    t_start = time.perf_counter()
    teacher_dir = teacher_folder(args.quick)
    work = bl.cache_root() / "runs" / ("signals-quick" if args.quick else "signals")
    work.mkdir(parents=True, exist_ok=True)
    batches = training_batches(teacher_dir, args, args.wire_batches)
    wire, loads = {}, {"start": round(load0, 2)}
    with start_teacher(teacher_dir, "hf", Placement.shared(), work / "wire-teacher.log", dtype="float32",
                       extra_args=["--device", "cpu", "--max-top-k", "256"]) as t:  # fmt: skip
        from teacher_server.client import TeacherClient

        with TeacherClient([t.address]) as c:
            args.vocab = c.info().vocab_size
        for v in args.chosen:
            wire[v.name] = wire_pass(t.address, v, batches, args.vocab)
            log.info("wire %-18s %9.1f B/token  teacher %7.0f ms  transport %s MB/s", v.name,
                     wire[v.name]["bytes_per_token"], wire[v.name]["teacher_ms"]["median"] or 0,
                     bl.fmt_summary(wire[v.name]["transport_mb_s"], 0))  # fmt: skip
    loads["after_wire"] = round(bl.load_average_1m(), 2)
    runs: list[dict] = []
    trained = [v for v in args.chosen if v.trained]
    for rep in range(0 if args.no_train else args.repeats):
        order = [None, *trained] if rep % 2 == 0 else [*reversed(trained), None]  # A/B alternated
        for v in order:
            runs.append(train_run(v, args, teacher_dir, work, rep))
        write(args, argv, load0, loads, wire, runs, teacher_dir, time.perf_counter() - t_start)
    write(args, argv, load0, loads, wire, runs, teacher_dir, time.perf_counter() - t_start)
    return 0


def write(args, argv, load0, loads, wire, runs, teacher_dir, wall_s) -> None:
    loads = loads | {"end": round(bl.load_average_1m(), 2)}
    if runs:
        after = [r["load_average_1m"] for r in runs]
        loads["after_each_run"] = {"min": min(after), "median": statistics.median(after), "max": max(after)}
    summary = summarize(runs) if runs else {}
    result = {
        "benchmark": "signals",
        "command": "python bench/signals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": bl.machine_info() | {"load_average_1m_at_start": round(load0, 2),
                                         "load_average_1m": loads},
        "config": {"teacher": "random-tiny" if args.quick else "smollm2-135m-instruct",
                   "teacher_dir": str(teacher_dir),
                   "teacher_dtype": "float32", "student_params_m": student_params_m(args, args.vocab),
                   "steps": args.steps, "warmup_steps_excluded": args.warmup_steps, "repeats": args.repeats,
                   "batch_size": args.batch_size, "seq_len": args.seq_len, "prefetch": args.prefetch,
                   "eval_batches": args.eval_batches, "loss": "forward_kl, T = 1",
                   "wire_batches": args.wire_batches,
                   "variants": [asdict(v) for v in args.chosen]},
        "wire": wire, "summary": summary, "goals": goals(summary, runs, wire), "runs": runs,
        "bench_wall_s": wall_s,
    }  # fmt: skip
    bl.write_json(args.out, result)
    if runs:
        plot(result, args.out.with_suffix(".png"))
    log.info("wrote %s", args.out)
    for k, g in result["goals"].items():
        log.info(
            "goal %-52s %s  %s",
            k,
            "met" if g["met"] else "NOT met",
            {a: b for a, b in g.items() if a != "met"},
        )


if __name__ == "__main__":
    sys.exit(main())
