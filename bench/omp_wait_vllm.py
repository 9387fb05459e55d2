"""The teacher's OpenMP wait policy with the vLLM backend (CPU build): OpenMP's default vs `passive`,
alternated (default, passive, passive, default). Each side: the vLLM teacher alone scoring the training
batches, then `asymkd train` (top-64 + tail, β = 0) beside it on the same cores, as vs_trl.py runs them.

    python bench/omp_wait_vllm.py      # ~7 min on 2 cores; writes bench/results/omp_wait_vllm.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from the repo root

from bench import benchlib as bl
from bench import vs_trl
from bench.runner import Placement, run_train, start_teacher, teacher_alone

ORDER = ["", "passive", "passive", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "omp_wait_vllm.json")
    args = p.parse_args(argv)
    load0 = bl.load_average_1m()
    pair = vs_trl.PAIRS["cpu"]
    teacher_dir, student_dir = vs_trl.build_pair(pair)
    batches = vs_trl.training_batches(student_dir, pair, args.steps, 0)
    cfg_args = argparse.Namespace(lr=3e-4, prefetch=4, steps=args.steps, seed=0, top_k=64)
    rows, t0 = [], time.perf_counter()
    for i, policy in enumerate(ORDER):
        out = bl.cache_root() / "runs" / "omp_wait_vllm" / str(i)
        out.mkdir(parents=True, exist_ok=True)
        extra = ["--device", pair.device, "--omp-wait-policy", policy]
        with start_teacher(teacher_dir, "vllm", Placement.shared(), out / "teacher.log", dtype=pair.dtype,
                           extra_args=extra) as teacher:  # fmt: skip
            alone = teacher_alone(teacher.address, batches, top_k=64, max_in_flight=4, warmup_batches=3)
            cfg = vs_trl.asymkd_config(student_dir, pair, cfg_args, beta=0.0, signal="top_k")
            tr = run_train(cfg, out, placement=Placement.shared(), teacher=teacher, warmup_steps=3)
        rows.append({"policy": policy or "openmp-default", "teacher_alone_samples_per_s": alone["samples_per_s"],
                     "train_samples_per_s": tr.samples_per_s, "teacher_wait_ms_mean": tr.teacher_wait_ms_mean,
                     "load_average_1m": bl.load_average_1m()})  # fmt: skip
        print(rows[-1], flush=True)
    bl.write_json(args.out, {
        "benchmark": "omp_wait_vllm", "command": "python bench/omp_wait_vllm.py " + " ".join(argv or sys.argv[1:]),
        "machine": bl.machine_info() | {"load_average_1m_at_start": round(load0, 2)},
        "runs": rows, "bench_wall_s": time.perf_counter() - t0,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
