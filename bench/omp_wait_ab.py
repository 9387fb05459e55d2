"""A/B of the teacher's OpenMP wait policy (`serve.omp_wait_policy`) on shared cores, through bench/vs_trl.py.

    python bench/omp_wait_ab.py [--rounds 1] [vs_trl.py flags, default: --betas 0 --no-vllm]

Each round runs vs_trl.py twice, one repeat each, alternating the order (round 0: before, after; round 1:
after, before): "before" serves with `--omp-wait-policy ""` (OpenMP's default: idle threads spin a while),
"after" with the default (`passive`: they sleep). Every vs_trl run pairs TRL with the asymkd runs, so each
side has its own TRL reference. Writes bench/results/omp_wait_ab.json: per run name and side, samples/s
(and the ratio to the same run's TRL), plus the paths of the vs_trl JSONs it merged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import benchlib as bl
from bench import vs_trl

log = logging.getLogger("bench.omp_wait_ab")
SIDES = {"before": ["--omp-wait-policy", ""], "after": []}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=bl.RESULTS_DIR / "omp_wait_ab.json")
    args, vs_trl_flags = p.parse_known_args(argv)
    vs_trl_flags = vs_trl_flags or ["--betas", "0", "--no-vllm"]
    runs: dict[str, dict[str, list[dict]]] = {}
    parts = []
    for rnd in range(args.rounds):
        order = list(SIDES) if rnd % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            out = args.out.with_name(f"{args.out.stem}-{side}-r{rnd}.json")
            flags = [*vs_trl_flags, "--repeats", "1", "--out", str(out), "--serve-args", *SIDES[side]]
            log.info("round %d, %s: vs_trl.py %s", rnd, side, " ".join(flags))
            vs_trl.main(flags)
            out.with_suffix(".png").unlink(missing_ok=True)  # the merged JSON is the result
            result = json.loads(out.read_text())
            parts.append({"round": rnd, "side": side, "path": str(out), "machine": result["machine"]})
            trl = {r["beta"]: r["samples_per_s"] for r in result["runs"] if r["kind"] == "trl"}
            for r in result["runs"]:
                ratio = r["samples_per_s"] / trl[r["beta"]] if r["kind"] == "asymkd" else None
                row = {"round": rnd, "samples_per_s": r["samples_per_s"], "vs_trl": ratio,
                       "teacher_wait_ms_mean": r.get("teacher_wait_ms_mean"),
                       "load_average_1m": r.get("load_average_1m")}  # fmt: skip
                runs.setdefault(r["name"], {}).setdefault(side, []).append(row)
    summary = {
        name: {
            side: {
                "samples_per_s": bl.summarize([r["samples_per_s"] for r in rows]),
                "vs_trl": bl.summarize([r["vs_trl"] for r in rows]),
            }
            for side, rows in sides.items()
        }
        for name, sides in runs.items()
    }
    bl.write_json(args.out, {
        "benchmark": "omp_wait_ab", "command": "python bench/omp_wait_ab.py " + " ".join(argv or sys.argv[1:]),
        "sides": {k: f"asymkd serve {' '.join(v) or '(default: --omp-wait-policy passive)'}" for k, v in SIDES.items()},
        "summary": summary, "runs": runs, "parts": parts,
    })  # fmt: skip
    for name, sides in summary.items():
        cells = [f"{s} {v['samples_per_s']['median']:.3f}" for s, v in sides.items()]
        log.info("%-28s %s", name, " | ".join(cells))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sys.exit(main())
