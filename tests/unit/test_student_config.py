"""`asymkd train` config: errors name the key and value, aliases resolve, the in-process teacher section and
its string shorthand, teacher target URIs, `asymkd cache write` keys, and the CLI exits 2 without a traceback.
"""

from __future__ import annotations

import typing

import pytest

from asymkd.cli import main, train
from asymkd.config import ConfigError, load_config
from student_trainer.config import (
    CacheWriteConfig,
    InProcessTeacherSection,
    LossName,
    TeacherSection,
    TrainConfig,
)
from student_trainer.parallel import ParallelDims

BASE = ["--model.tokenizer", "/tok", "--data.builtin", "stdlib-docs"]


def _load(*flags: str) -> TrainConfig:
    return load_config(TrainConfig, None, [*BASE, *flags])


def test_defaults_and_overrides():
    cfg = _load(
        "--optim.lr", "3e-3", "--teacher.targets", "[a:1, 'b.example:50051']", "--checkpoint.resume=true"
    )
    assert cfg.optim.lr == 3e-3 and cfg.teacher.targets == ["a:1", "b.example:50051"]
    assert cfg.checkpoint.resume is True and cfg.uses_teacher and not cfg.has_eval
    assert not _load().uses_teacher and _load().teacher.in_process is None


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
        (["--optim.lr", "-1"], "optim: lr=-1.0 is out of range"),
        (["--optim.betas", "[0.9]"], "optim: betas=[0.9]"),
        (["--optim.micro_batch_size", "0"], "optim: micro_batch_size=0"),
        (["--data.seq-len", "1"], "data: seq_len=1"),
        (["--data.eval_fraction", "1.0"], "data: eval_fraction=1.0"),
        (["--data.paths", "[x.txt]"], "data: set paths=['x.txt'] or builtin='stdlib-docs', not both"),
        (["--parallel.reduce-dtype", "fp16"], "parallel: reduce_dtype='fp16'"),
        (["--distill.loss", "kl"], "distill.loss: 'kl' is not one of ['forward_kl', "),
        (["--distill.temperature", "0"], "distill: temperature=0.0"),
        (["--teacher.targets", "[localhost]"], "teacher: targets ['localhost'] are not host:port"),
        (["--teacher.prefetch", "0"], "teacher: prefetch=0"),
        (
            ["--teacher.targets", "[a:1]", "--teacher.in-process", "/t"],
            "teacher: set one live teacher (targets or in_process), got targets=['a:1'], in_process='/t'",
        ),
        (
            ["--teacher.cache", "/c", "--teacher.cache_append", "true"],
            "teacher: cache_append=true needs cache and a live teacher (targets or in_process)",
        ),
        (["--checkpoint.keep", "0"], "checkpoint: keep=0"),
        (["--run.eval_every", "5"], "run.eval_every=5 needs held-out data"),
        (
            ["--model.hidden_size", "30", "--model.num_heads", "4"],
            "model: hidden_size=30 is not a multiple of num_heads=4",
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
        "--parallel.reduce-dtype", "bf16", "--parallel.param_dtype", "fp32", "--distill.loss", "skew_rkl"
    )
    assert cfg.parallel.reduce_dtype == "bfloat16" and cfg.parallel.param_dtype == "float32"
    assert cfg.distill.loss == "skew_reverse_kl"
    assert _load("--checkpoint.resume", "/runs/x/checkpoints/step_0000010").checkpoint.resume.endswith("10")


def test_loss_names_are_the_losses_module_ones():
    from student_trainer.losses import LOSS_NAMES, TOKEN_LOSS_NAMES

    assert set(typing.get_args(LossName)) == set(LOSS_NAMES + TOKEN_LOSS_NAMES) | {"skew_kl", "skew_rkl"}


def test_in_process_string_shorthand_and_nested_section(tmp_path):
    for cfg in (_load("--teacher.in-process", "default"), _load("--teacher.in_process.model=default")):
        assert cfg.teacher.in_process == InProcessTeacherSection(model="default") and cfg.uses_teacher
    assert TeacherSection(in_process="/m").in_process == InProcessTeacherSection(model="/m")
    flags = _load("--teacher.in_process.model", "/m", "--teacher.in_process.dtype", "bfloat16")
    assert (flags.teacher.in_process.model, flags.teacher.in_process.dtype) == ("/m", "bfloat16")
    assert flags.teacher.in_process.device == ""  # "" = the student's device
    mapping = _load("--teacher.in-process", "{model: /m, dtype: bfloat16, max_top_k: 64}").teacher.in_process
    assert (mapping.model, mapping.dtype, mapping.max_top_k) == ("/m", "bfloat16", 64)
    (tmp_path / "a.yaml").write_text("teacher:\n  in_process: default\n")
    (tmp_path / "b.yaml").write_text("teacher:\n  in_process: {model: /m, dtype: bfloat16}\n")
    assert load_config(TrainConfig, tmp_path / "a.yaml", BASE).teacher.in_process.model == "default"
    assert load_config(TrainConfig, tmp_path / "b.yaml", BASE).teacher.in_process.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--teacher.in_process.dtype", "bfloat16"], "teacher: in_process.model is empty"),
        (
            ["--teacher.in-process", "/m", "--teacher.in_process.dtype", "bfloat16"],
            "in_process.model is empty",
        ),
        (["--teacher.in_process.dtype", "bf"], "teacher.in_process.dtype: 'bf' is not one of"),
        (["--teacher.in_process.modle", "x"], "unknown config key 'teacher.in_process.modle'"),
        (["--teacher.in-process", "{model: x, dtype: bf}"], "is neither a model nor `asymkd serve` keys"),
        (
            ["--teacher.in_process.model", "x", "--teacher.in_process.max_batch_tokens", "0"],
            "teacher.in_process: max_batch_tokens=0 is out of range",
        ),
    ],
)
def test_in_process_mistakes_are_named(flags, needle):
    with pytest.raises(ConfigError) as err:
        _load(*flags)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "target",
    [
        "10.0.0.1:50051",
        "teacher-0.svc.cluster.local:50051",
        "[::1]:50051",
        "dns:///teacher.example:50051",
        "dns://8.8.8.8/teacher.example:443",
        "dns:teacher:50051",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        "ipv6:[::1]:50051",
        "unix:/tmp/teacher.sock",
        "unix:///tmp/teacher.sock",
    ],
)
def test_teacher_targets_accept_grpc_uris(target):
    assert TeacherSection(targets=[target]).targets == [target]


@pytest.mark.parametrize(
    "target",
    ["localhost", "http://x:1", "dns:", "ipv4:host.name:1", "unix:", "a:b", "a :1", "ipv4:1.2.3.4:5,"],
)
def test_teacher_targets_refuse_garbage(target):
    with pytest.raises(ValueError, match="are not host:port or a gRPC URI"):
        TeacherSection(targets=[target])


def test_cache_write_keys():
    base = [*BASE, "--teacher.targets", "[a:1]"]
    cfg = load_config(CacheWriteConfig, None, [*base, "--out", "/c", "--shard-rows", "64"])
    assert (cfg.out, cfg.shard_rows, cfg.model.tokenizer, cfg.encoding) == ("/c", 64, "/tok", "delta-q4")
    with pytest.raises(ConfigError, match=r"^out='': --out DIR is required"):
        load_config(CacheWriteConfig, None, base)
    with pytest.raises(ConfigError, match=r"^shard_rows=0 is out of range"):
        load_config(CacheWriteConfig, None, [*base, "--out", "/c", "--shard-rows", "0"])
    with pytest.raises(ConfigError, match=r"needs a teacher to score the rows"):
        load_config(CacheWriteConfig, None, [*BASE, "--out", "/c"])
    with pytest.raises(ConfigError, match=r"^out='/c' is teacher.cache"):
        load_config(CacheWriteConfig, None, [*BASE, "--out", "/c", "--teacher.cache", "/c"])
    with pytest.raises(ConfigError, match=r"encoding.*'delta-q2'"):
        load_config(CacheWriteConfig, None, [*base, "--out", "/c", "--encoding", "delta-q2"])


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
    assert train([*BASE, "--optim.lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "asymkd train: config error: optim: lr=-1.0 is out of range\n"
    assert train(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_help_lists_every_section(capsys):
    assert main(["train", "--help"]) == 0
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
    assert 'HF model folder; "" = random init from the keys below (type: str, default: "")' in " ".join(
        out.split()
    )
