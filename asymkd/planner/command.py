"""The body of `asymkd plan` (asymkd/cli.py holds only the thin handler that calls `run_command` with these).

    argv = emit_argv(["--emit", "slurm", "out/"])   # -> ["--emit", "slurm", "--emit-dir", "out/"]
    run_plan(cfg)                                    # prints the plan; writes launch files with --emit

`--emit KIND DIR` is the one flag that takes two values; `emit_argv` rewrites it to the two config keys
`emit` and `emit_dir` before parsing (`--emit-dir DIR` and `emit_dir:` in YAML work as well).
"""

from __future__ import annotations

import json
import logging
import sys

from asymkd.config import ConfigError
from asymkd.planner.cluster import build_inputs, build_models
from asymkd.planner.config import PlanConfig
from asymkd.planner.inflection import inflection
from asymkd.planner.report import MARKDOWN_HEADER, as_dict, as_markdown_row, as_text, top_lines
from asymkd.planner.search import NoPlanError, PlanResult, search

log = logging.getLogger("asymkd.plan")


def emit_argv(argv: list[str]) -> list[str]:
    """`--emit KIND DIR` -> `--emit KIND --emit-dir DIR` (also `--emit=KIND DIR`); the rest unchanged."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        kind = arg.partition("=")[2] if arg.startswith("--emit=") else None
        if arg == "--emit" and i + 2 < len(argv) and not argv[i + 2].startswith("-"):
            out += ["--emit", argv[i + 1], "--emit-dir", argv[i + 2]]
            i += 3
            continue
        if kind is not None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out += ["--emit", kind, "--emit-dir", argv[i + 1]]
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def plan_data(cfg: PlanConfig) -> tuple[dict, PlanResult]:
    """Resolve models and cluster (calibrating if asked), search, and the result as the JSON dict."""
    measured, calibration = None, None
    if cfg.calibrate:
        from asymkd.planner.calibrate import calibrate

        measured, calibration = calibrate(cfg.calibrate_s, gpus_per_node=cfg.gpus_per_node)
    teacher, student = build_models(cfg)
    cluster, workload = build_inputs(cfg, measured)
    result = search(teacher, student, cluster, workload)
    # The inflection of the best split's replica (the best plan's, unless the symmetric layout won).
    split = next((p.teacher for p in result.candidates if p.teacher is not None), None)
    g = split.layout.gpus_per_replica if split else 2
    in_flight = split.in_flight if split else cfg.prefetch
    inf = inflection(teacher, gpus_per_replica=g, in_flight=in_flight, cluster=cluster, workload=workload)
    data = as_dict(result, inf, teacher, student, cluster, workload)
    data["calibration"] = calibration
    return data, result


def run_plan(cfg: PlanConfig) -> int:
    """Print the plan (text, --json or --markdown); --emit writes the launch files. No fit: exit 1."""
    try:
        data, result = plan_data(cfg)
    except NoPlanError as e:
        print(f"asymkd plan: {e}", file=sys.stderr)
        return 1
    if cfg.emit:
        from asymkd.planner.emit import emit

        try:
            _, data["emit"] = emit(cfg, result, data["cluster"]["gpus_per_node"])
        except ValueError as e:
            raise ConfigError(f"emit: {e}") from None
    if cfg.json:
        print(json.dumps(data, indent=2))
    elif cfg.markdown:
        print(f"{MARKDOWN_HEADER}\n{as_markdown_row(data)}" if cfg.markdown_header else as_markdown_row(data))
    else:
        print(as_text(data, top_lines(result, cfg.top)))
        if "emit" in data:
            print(
                "\n".join(
                    filter(None, [data["emit"]["note"], *(f"wrote {p}" for p in data["emit"]["files"])])
                )
            )
    return 0
