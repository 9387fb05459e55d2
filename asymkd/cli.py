"""The `asymkd` command: one console script, one subcommand per component.

asymkd serve --model PATH --backend {hf,vllm} --port 50051     # teacher service
asymkd train --config run.yaml [--section.key value ...]       # student (under torchrun for N ranks)
asymkd run --config examples/demo.yaml                         # local teacher + student, one machine
asymkd plan ...                                                # partition planner, launch files
asymkd cache ...                                               # offline teacher-logit cache
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> "module:function"; each function takes argv (list[str]) and returns an exit code.
COMMANDS = {
    "serve": ("teacher_server.server:main", "run the teacher gRPC service"),
    "train": ("student_trainer.cli:train_main", "train a student against a running teacher"),
    "run": ("student_trainer.cli:run_main", "embedded default: local teacher + student on one machine"),
    "plan": ("asymkd.planner:main", "partition planner (teacher vs student split, launch files)"),
    "cache": ("student_trainer.cache:main", "write / inspect an offline teacher-logit cache"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<6} {desc}" for name, (_, desc) in COMMANDS.items())
    return f"usage: asymkd <command> [options]\n\ncommands:\n{rows}\n\n`asymkd <command> --help` for options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"asymkd: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"asymkd {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
        return 2
    return int(getattr(module, func_name)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
