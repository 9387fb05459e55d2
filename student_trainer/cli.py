"""`asymkd train` (the student trainer) and `asymkd run` (local teacher + student demo).

    asymkd train --config run.yaml [--section.key value ...]              # one rank
    torchrun --nproc_per_node=2 -m asymkd.cli train --config run.yaml      # N ranks (gloo on CPU, NCCL on GPU)
    asymkd train --help                                                   # every key, type and default

A config error exits with status 2 and a one-line message naming the key (no traceback).
"""

from __future__ import annotations

import sys

from asymkd.configs import ConfigError, describe_fields, load_config
from student_trainer.config import TrainConfig

USAGE = "usage: asymkd train --config run.yaml [--section.key value ...]"


def _help() -> str:
    rows = [f"  {flag:<40} {tp:<14} {default!r}" for flag, tp, default in describe_fields(TrainConfig)]
    return "\n".join([USAGE, "", "keys (YAML section.key, or a flag):", *rows])


def parse_train_args(argv: list[str]) -> TrainConfig:
    """`--config FILE` plus overrides → TrainConfig (raises ConfigError)."""
    config_path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            config_path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_path = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    if config_path is not None and not config_path:
        raise ConfigError("--config needs a file")
    try:
        return load_config(TrainConfig, config_path, rest)
    except FileNotFoundError as e:
        raise ConfigError(f"--config: {e}") from None


def train_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(_help())
        return 0
    try:
        cfg = parse_train_args(argv)
    except ConfigError as e:
        print(f"asymkd train: config error: {e}", file=sys.stderr)
        return 2
    from student_trainer.parallel import destroy_distributed
    from student_trainer.trainer import Trainer

    try:
        trainer = Trainer(cfg)  # fails fast: parallel degrees, tokenizer, data files, teacher handshake
        try:
            trainer.train()
        finally:
            trainer.close()
    except ConfigError as e:
        print(f"asymkd train: config error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0


def run_main(argv: list[str]) -> int:
    from student_trainer.local_run import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
