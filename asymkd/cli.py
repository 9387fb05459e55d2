"""The `asymkd` command: one console script, one thin handler per subcommand (configs: asymkd/config.py).

    asymkd serve --model PATH --backend {hf,vllm} --port 50051     # teacher service
    asymkd train --config run.yaml [--section.key value ...]       # student (under torchrun for N ranks)
    asymkd run --config examples/demo.yaml                         # local teacher + student, one machine
    asymkd cache write --config train.yaml --out DIR               # offline teacher-logit cache
    asymkd cache info DIR
    torchrun --nproc_per_node=2 -m asymkd.cli train --config run.yaml

`asymkd <command> --help` lists every key. A config mistake exits 2 with one line naming the key. Handlers
import their component when they run, so `--help` and config errors answer at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from asymkd import __version__
from asymkd.config import ConfigError, run_command

if TYPE_CHECKING:
    from asymkd.local_run import RunConfig
    from student_trainer.config import CacheWriteConfig, TrainConfig
    from teacher_server.config import ServeConfig

CACHE_USAGE = """usage: asymkd cache write --config train.yaml --out DIR [--encoding NAME] [--section.key value ...]
       python -m asymkd.torchrun --nproc_per_node=N -m asymkd.cli cache write ...   (N ranks)
       asymkd cache info DIR [--json]

  write   score every packed training row of the config once through its teacher (teacher.targets,
          teacher.in_process, or teacher.cache to re-encode) and store the answers in DIR; the same command
          again resumes an interrupted write (`asymkd cache write --help` lists every key and encoding)
  info    what the cache in DIR holds: rows, tokens, bytes per token, encoding, teacher, data;
          --json prints the manifest"""


# ------------------------------------------------------------------------------------------------ serve
def serve(argv: list[str]) -> int:
    """`asymkd serve`: exit 2 on a bad config, 1 when the model cannot load, 0 after a drain."""
    from teacher_server.config import ServeConfig

    return run_command(ServeConfig, argv, _serve, prog="asymkd serve")


def _serve(cfg: ServeConfig) -> int:
    import asyncio

    if cfg.omp_wait_policy and "torch" not in sys.modules:  # OpenMP reads it once, when torch loads
        os.environ["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY") or cfg.omp_wait_policy.upper()
    from teacher_server.server import configure_logging
    from teacher_server.server import serve as serve_teacher

    configure_logging(cfg.log_level)
    return asyncio.run(serve_teacher(cfg))


# ------------------------------------------------------------------------------------------------ train
def train(argv: list[str]) -> int:
    """`asymkd train` (one rank, or each rank of a torchrun job)."""
    from student_trainer.config import TrainConfig

    return run_command(TrainConfig, argv, _train, prog="asymkd train")


def _train(cfg: TrainConfig) -> int:
    """0 when the run ends; 128 + the signal after SIGINT/SIGTERM (a checkpoint was written and the command
    that resumes it printed), with no traceback."""
    from student_trainer.interrupt import Interrupted
    from student_trainer.parallel import destroy_distributed
    from student_trainer.trainer import Trainer

    try:
        trainer = Trainer(cfg)  # fails fast: parallel degrees, tokenizer, data files, teacher handshake
        try:
            trainer.train()
        finally:
            trainer.close()
    except Interrupted as e:
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the first step: nothing trained, nothing to save
        print("asymkd train: interrupted before training started", file=sys.stderr)
        return 130
    finally:
        destroy_distributed()
    return 0


# -------------------------------------------------------------------------------------------------- run
def run(argv: list[str]) -> int:
    """`asymkd run`: a local teacher + the student on one machine (asymkd/local_run.py)."""
    from asymkd.local_run import RunConfig

    return run_command(RunConfig, argv, _run, prog="asymkd run")


def _run(cfg: RunConfig) -> int:
    import signal

    from asymkd.local_run import run as run_local
    from student_trainer.observability import setup_logging

    setup_logging(0)
    # SIGTERM unwinds like Ctrl-C, so the teacher child process (its own session) is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run_local(cfg)
    return 0


# ------------------------------------------------------------------------------------------------ cache
def cache(argv: list[str]) -> int:
    """`asymkd cache write ...` / `asymkd cache info DIR`."""
    if argv[:1] in (["-h"], ["--help"]) or argv[:2] in (["info", "-h"], ["info", "--help"]):
        print(CACHE_USAGE)
        return 0
    if not argv or argv[0] not in ("write", "info"):
        what = f"unknown command {argv[0]!r}" if argv else "a command is needed"
        print(f"asymkd cache: {what}\n{CACHE_USAGE}", file=sys.stderr)
        return 2
    if argv[0] == "info":
        return _cache_info(argv[1:])
    from student_trainer.config import CacheWriteConfig

    return run_command(CacheWriteConfig, argv[1:], _cache_write, prog="asymkd cache write")


def _cache_write(cfg: CacheWriteConfig) -> int:
    """0 when every shard and the manifest are written; 128 + the signal after SIGINT/SIGTERM (the shards
    written are kept: the same command continues)."""
    from student_trainer.cache import WriteInterrupted, write_cache
    from student_trainer.observability import setup_logging

    setup_logging(int(os.environ.get("RANK", "0")))
    try:
        m = write_cache(cfg)
    except WriteInterrupted as e:
        print(f"asymkd cache write: {e}", file=sys.stderr)
        return e.exit_code
    if m.get("complete"):
        print(f"wrote {m['rows']} rows, {m['tokens']} tokens ({m['encoding']}, {m['bytes_per_token']} B/token) "
              f"in {len(m['shards'])} shards to {cfg.out} ({m['writer']['seconds']} s)")  # fmt: skip
    return 0


def _cache_info(args: list[str]) -> int:
    from pathlib import Path

    as_json = "--json" in args
    folders = [a for a in args if a != "--json"]
    try:
        if len(folders) != 1 or folders[0].startswith("-"):
            raise ConfigError(f"`asymkd cache info` takes one folder (and --json), got {args}")
        from student_trainer.cache import describe, summarize

        summary = summarize(Path(folders[0]))
    except ConfigError as e:
        print(f"asymkd cache info: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if as_json else describe(summary))
    return 0


# ------------------------------------------------------------------------------------------------- plan
def plan(argv: list[str]) -> int:
    """`asymkd plan`: the partition planner (asymkd/planner/; `--emit KIND DIR` is rewritten to two keys)."""
    from asymkd.planner.command import emit_argv, run_plan
    from asymkd.planner.config import PlanConfig

    return run_command(PlanConfig, emit_argv(argv), run_plan, prog="asymkd plan")


# ------------------------------------------------------------------------------------------- dispatcher
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (serve, "run the teacher gRPC service"),
    "train": (train, "train a student against a teacher (servers, in process, or a cache)"),
    "run": (run, "embedded default: local teacher + student on one machine"),
    "cache": (cache, "write / inspect an offline teacher-logit cache"),
    "plan": (plan, "partition planner: pick the teacher/student split of a cluster"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<6} {desc}" for name, (_, desc) in COMMANDS.items())
    return (
        f"usage: asymkd <command> [options]\n\ncommands:\n{rows}\n\n"
        "`asymkd <command> --help` for its options; `asymkd --version`."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"asymkd {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"asymkd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return COMMANDS[name][0](rest)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of torchrun, its work done and its process group left: exit without running C++ static
        # destructors, which can race at exit and abort a finished rank ("terminate called without an active
        # exception", seen in ~1 of 25 two-rank gloo runs here, after destroy_process_group).
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)
