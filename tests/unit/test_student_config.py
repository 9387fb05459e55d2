"""`asymkd train` config: errors name the key and value, aliases resolve, the CLI exits 2 without a traceback."""

from __future__ import annotations

import pytest

from asymkd.configs import ConfigError, load_config
from student_trainer.cli import train_main
from student_trainer.config import TrainConfig
from student_trainer.parallel import ParallelDims

BASE = ["--model.tokenizer", "/tok", "--data.builtin", "stdlib-docs"]


def _load(*flags: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*BASE, *flags])


def test_defaults_and_overrides():
    cfg = _load("--optim.lr", "3e-3", "--teacher.targets", "[a:1, 'b.example:50051']", "--checkpoint.resume")
    assert cfg.optim.lr == 3e-3 and cfg.teacher.targets == ["a:1", "b.example:50051"]
    assert cfg.checkpoint.resume is True and cfg.uses_teacher and not cfg.has_eval
    cfg = _load("--teacher.in_process", "default", "--teacher.in_process_args", "[--dtype, bfloat16]")
    assert cfg.uses_teacher and cfg.teacher.in_process_args == ["--dtype", "bfloat16"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
        (["--optim.lr", "-1"], "lr=-1.0"),
        (["--optim.betas", "[0.9]"], "betas=[0.9]"),
        (["--optim.micro_batch_size", "0"], "micro_batch_size=0"),
        (["--data.seq_len", "1"], "seq_len=1"),
        (["--data.eval_fraction", "1.0"], "eval_fraction=1.0"),
        (["--data.paths", "[x.txt]"], "not both"),
        (["--parallel.reduce_dtype", "fp16"], "reduce_dtype='fp16'"),
        (["--distill.loss", "kl"], "loss='kl'"),
        (["--distill.temperature", "0"], "temperature=0.0"),
        (["--teacher.targets", "[localhost]"], "['localhost'] are not host:port"),
        (["--teacher.prefetch", "0"], "prefetch=0"),
        (
            ["--teacher.targets", "[a:1]", "--teacher.in_process", "/t"],
            "in 'teacher': set one teacher source (targets, in_process or cache), got targets=['a:1'], in_process='/t'",
        ),
        (
            ["--teacher.in_process", "/t", "--teacher.cache", "/c"],
            "set one teacher source (targets, in_process or cache), got in_process='/t', cache='/c'",
        ),
        (
            ["--teacher.in_process_args", "[--dtype, bfloat16]"],
            "in_process_args=['--dtype', 'bfloat16'] needs in_process",
        ),
        (["--checkpoint.keep", "0"], "keep=0"),
        (["--run.eval_every", "5"], "run.eval_every=5 needs held-out data"),
        (
            ["--model.hidden_size", "30", "--model.num_heads", "4"],
            "hidden_size=30 is not a multiple of num_heads=4",
        ),
    ],
)
def test_errors_name_key_and_value(flags, needle):
    with pytest.raises(ConfigError) as err:
        _load(*flags)
    assert needle in str(err.value)


def test_missing_model_and_data_are_named():
    with pytest.raises(ConfigError, match=r"model\.path"):
        load_config(TrainConfig, None, ["--data.builtin", "stdlib-docs"])
    with pytest.raises(ConfigError, match=r"data\.paths"):
        load_config(TrainConfig, None, ["--model.path", "/m"])


def test_aliases_are_canonicalized():
    cfg = _load(
        "--parallel.reduce_dtype", "bf16", "--parallel.param_dtype", "fp32", "--distill.loss", "skew_rkl"
    )
    assert cfg.parallel.reduce_dtype == "bfloat16" and cfg.parallel.param_dtype == "float32"
    assert cfg.distill.loss == "skew_reverse_kl"
    assert _load("--checkpoint.resume", "/runs/x/checkpoints/step_0000010").checkpoint.resume.endswith("10")


def test_parallel_dims():
    assert ParallelDims(1, -1, 4).dp_shard == 4
    assert ParallelDims(2, -1, 4).dp_shard == 2 and ParallelDims(2, -1, 4).dp_size == 4
    with pytest.raises(ValueError, match=r"dp_replicate=1 × dp_shard=3 = 3 does not match WORLD_SIZE=2"):
        ParallelDims(1, 3, 2)
    with pytest.raises(ValueError, match="dp_replicate=3 does not divide WORLD_SIZE=4"):
        ParallelDims(3, -1, 4)
    with pytest.raises(ValueError, match="dp_shard=0"):
        ParallelDims(1, 0, 2)


def test_cli_config_error_exits_2_with_message(capsys, tmp_path):
    assert train_main([*BASE, "--optim.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "lr=-1.0" in err and "Traceback" not in err
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_help_lists_every_section(capsys):
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--model.path",
        "--data.seq-len",
        "--optim.grad-accum-steps",
        "--parallel.reduce-dtype",
        "--distill.loss",
        "--teacher.targets",
        "--teacher.in-process",
        "--checkpoint.resume",
        "--metrics.jsonl",
        "--run.steps",
    ):
        assert flag in out
