"""The one config loader (asymkd/config.py) and the `asymkd` commands built on it.

Defaults < YAML < flags whatever the position of `--config`; the flag syntax users' scripts rely on; every
mistake is one line naming the key (`FILE:LINE:COL` for YAML syntax); `--help` documents every key; the
resolved config round-trips; every config error of the CLI exits 2 with one line on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from asymkd import __version__
from asymkd.cli import main
from asymkd.config import ConfigError, dump_config, load_config, parse_args, run_command
from asymkd.local_run import RunConfig
from student_trainer.config import TrainConfig
from teacher_server.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Optim:
    """The optimizer."""

    lr: float = 1e-3
    """the peak learning rate"""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas"""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} is out of range")


@dataclass
class Root:
    """A run."""

    name: str = "run"
    """the run's name"""
    steps: int = 10
    """optimizer steps"""
    fsdp: bool = False
    """shard the model"""
    tag: str | None = None
    """a label"""
    mode: Literal["fast", "exact"] = "fast"
    """how to compute"""
    extra: dict = field(default_factory=dict)
    """anything else"""
    optim: Optim = field(default_factory=Optim)


def _yaml(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{c}", "--steps", "30", "--optim.lr", "0.5"],
        ["--steps", "30", "--optim.lr", "0.5", "--config", "{c}"],
        ["--steps", "30", "--config={c}", "--optim.lr=0.5"],
    ],
)
def test_flags_override_the_yaml_wherever_config_is(tmp_path, argv):
    c = _yaml(tmp_path, "steps: 20\nname: from-yaml\noptim:\n  lr: 0.01\n")
    cfg = parse_args(Root, [a.replace("{c}", str(c)) for a in argv], prog="t")
    assert (cfg.steps, cfg.name, cfg.optim.lr, cfg.optim.betas) == (30, "from-yaml", 0.5, [0.9, 0.95])


def test_dashes_and_underscores_are_the_same_key():
    cfg = load_config(
        ServeConfig,
        None,
        ["--max-wait-ms", "5", "--vllm.enforce-eager", "true", "--backend=vllm", "--tensor-parallel-size=2"],
    )
    assert cfg.max_wait_ms == 5.0 and cfg.vllm.enforce_eager is True and cfg.tensor_parallel_size == 2
    assert (
        load_config(ServeConfig, None, ["--max_wait_ms=7", "--vllm.enforce_eager=false"]).max_wait_ms == 7.0
    )
    # values are never rewritten: a dash inside a value stays
    assert load_config(Root, None, ["--name", "a-b_c", "--tag=--x-y"]).tag == "--x-y"


def test_booleans_lists_and_dicts():
    cfg = load_config(
        Root, None, ["--fsdp", "true", "--optim.betas", "[0.8, 0.99]", "--extra", "{x: 1, y: [a]}"]
    )
    assert cfg.fsdp is True and cfg.optim.betas == [0.8, 0.99] and cfg.extra == {"x": 1, "y": ["a"]}
    assert load_config(Root, None, ["--fsdp=false"]).fsdp is False
    serve = load_config(ServeConfig, None, ["--vllm.extra-engine-args", "{swap_space: 4}"])
    assert serve.vllm.extra_engine_args == {"swap_space": 4}


def test_a_bare_boolean_flag_means_true():
    serve = load_config(ServeConfig, None, ["--vllm.enforce-eager", "--port", "7", "--warmup"])
    assert serve.vllm.enforce_eager is True and serve.warmup is True and serve.port == 7
    assert load_config(ServeConfig, None, ["--warmup", "false"]).warmup is False
    with pytest.raises(ConfigError, match="port"):  # only booleans go without a value
        load_config(ServeConfig, None, ["--port", "--warmup"])


def test_scientific_floats_from_yaml_and_numeric_strings_from_flags(tmp_path):
    # YAML 1.1 reads `3e-4` as a string; the float field still gets 0.0003
    assert load_config(Root, _yaml(tmp_path, "optim:\n  lr: 3e-4\n")).optim.lr == pytest.approx(3e-4)
    cfg = load_config(Root, None, ["--name", "123", "--tag=7"])
    assert cfg.name == "123" and cfg.tag == "7"
    assert load_config(ServeConfig, None, ["--model", "123"]).model == "123"


@pytest.mark.parametrize(
    ("text", "flags", "message"),
    [
        ("optim:\n  lrr: 1\n", [], "unknown config key 'optim.lrr'"),
        ("stepz: 3\n", [], "unknown config key 'stepz'"),
        ("", ["--stepz", "3"], "unknown config key 'stepz'"),
        ("", ["--optim.lrr=1"], "unknown config key 'optim.lrr'"),
        ("", ["--optimm.lr", "1"], "unknown config key 'optimm.lr'"),
        ("", ["--steps", "many"], "steps: expected an integer, got 'many'"),
        ("", ["--fsdp", "3"], "fsdp: expected true/false, got '3'"),
        ("", ["--mode", "slow"], "mode: 'slow' is not one of ['fast', 'exact']"),
        ("", ["--optim.lr", "-1"], "optim: lr=-1.0 is out of range"),
        ("optim: {lr: -2}\n", [], "optim: lr=-2.0 is out of range"),
        ("optim: [1, 2]\n", [], "optim: expected a mapping of optim keys, got [1, 2]"),
        ("", ["--optim", "abc"], "optim: expected a mapping of keys or a YAML file, got 'abc'"),
        ("", ["positional"], "unexpected argument(s) 'positional': keys are given as --key value"),
    ],
)
def test_mistakes_are_one_line_naming_the_key(tmp_path, text, flags, message):
    with pytest.raises(ConfigError) as err:
        load_config(Root, _yaml(tmp_path, text) if text else None, flags)
    assert str(err.value) == message


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    bad = _yaml(tmp_path, "steps: 20\noptim:\n  lr: 0.1\n  betas: [0.9, 0.95\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:5:1: expected ',' or '\]'.*flow sequence from 4:10"):
        load_config(Root, bad)
    tab = _yaml(tmp_path, "steps: 20\n\tname: x\n", "tab.yaml")
    with pytest.raises(ConfigError, match=rf"^{tab}:2:1: found character '\\t'"):
        load_config(Root, tab)
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(Root, _yaml(tmp_path, "- 1\n- 2\n", "list.yaml"))
    assert load_config(Root, _yaml(tmp_path, "", "empty.yaml")) == Root()


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope\.yaml: no such file"):
        load_config(Root, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="--config needs a YAML file"):
        parse_args(Root, ["--config"], prog="t")


def test_post_init_errors_name_their_section():
    base = ["--train.model.tokenizer", "t", "--train.data.builtin", "stdlib-docs"]
    with pytest.raises(ConfigError, match=r"^serve\.vllm: node_rank must be in"):
        load_config(RunConfig, None, [*base, "--serve.vllm.nnodes", "0"])
    # the same class (VLLMOptions) at another path: the failing one is named
    nested = ["--train.teacher.in_process.model", "m", "--train.teacher.in_process.vllm.nnodes", "0"]
    with pytest.raises(ConfigError, match=r"^train\.teacher\.in_process\.vllm: node_rank must be in"):
        load_config(RunConfig, None, [*base, *nested])
    with pytest.raises(ConfigError, match=r"^train\.optim: lr=-1\.0 is out of range"):
        load_config(RunConfig, None, [*base, "--train.optim.lr", "-1"])
    with pytest.raises(ConfigError, match=r"^port=-1 is out of range"):
        load_config(ServeConfig, None, ["--port", "-1"])


def test_dump_config_round_trips(tmp_path):
    flags = ["--model.tokenizer", "/tok", "--data.paths", "[a.txt, b.jsonl]", "--optim.lr", "3e-4"]
    flags += ["--teacher.in_process.model", "default", "--teacher.in_process.dtype", "bfloat16"]
    flags += ["--checkpoint.resume", "/runs/x/step_0000010", "--distill.loss", "skew_kl"]
    cfg = load_config(TrainConfig, None, flags)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(TrainConfig, tmp_path / "resolved.yaml") == cfg
    assert (
        yaml.safe_load((tmp_path / "resolved.yaml").read_text())["teacher"]["in_process"]["dtype"]
        == "bfloat16"
    )
    run = load_config(RunConfig, REPO / "examples" / "demo.yaml", ["--serve.metrics-port", "0"])
    dump_config(run, tmp_path / "run.yaml")
    assert load_config(RunConfig, tmp_path / "run.yaml") == run


def test_the_example_files_load():
    demo = load_config(RunConfig, REPO / "examples" / "demo.yaml")
    assert (
        demo.serve.dtype == "bfloat16" and demo.train.optim.lr == pytest.approx(3e-3) and demo.compare_ce_only
    )
    kd = load_config(TrainConfig, REPO / "examples" / "train_kd.yaml")
    assert kd.teacher.targets == ["127.0.0.1:50051"] and kd.teacher.timeout_s == 120.0 and kd.run.steps == 500


@pytest.mark.parametrize(
    ("command", "needles"),
    [
        (
            ["serve"],
            ["--max-wait-ms", "how long the batcher waits", "type: float", "default: 5.0", "{hf,vllm}"],
        ),
        (
            ["train"],
            ["--optim.lr", "peak learning rate", "type: float", "default: 0.0003", "{cosine,constant}"],
        ),
        (
            ["run"],
            [
                "--nproc-per-node",
                "student ranks",
                "type: int",
                "default: 1",
                "{top_k,full,hidden,sampled,at_ids,target_only}",
            ],
        ),
        (["cache", "write"], ["--out", "the cache folder", "type: str", "default: 1024", "{auto,text,jsonl"]),
    ],
)
def test_help_shows_description_type_default_and_choices(capsys, command, needles):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, needle
    assert "Literal" not in out.split("options:")[0]  # choices, not the bare type name, in the usage


BAD_VALUE = {"serve": "max_wait_ms: x\n", "run": "train: {optim: {lr: x}}\n"}  # others: a train config


@pytest.mark.parametrize("command", [["serve"], ["train"], ["run"], ["cache", "write"]])
@pytest.mark.parametrize(
    ("mistake", "needle"),
    [
        ("unknown key", "unknown config key 'nokey'"),
        ("missing file", "missing.yaml: no such file"),
        ("yaml syntax", "bad.yaml:2:1: "),
        ("bad value", "lr: expected a number, got 'x'"),
    ],
)
def test_every_config_error_exits_2_with_one_line(tmp_path, capsys, command, mistake, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n" if mistake == "yaml syntax" else BAD_VALUE.get(command[0], "optim: {lr: x}\n"))
    argv = {
        "unknown key": ["--nokey", "1"],
        "missing file": ["--config", str(tmp_path / "missing.yaml")],
    }.get(mistake, ["--config", str(bad)])
    assert main([*command, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asymkd {' '.join(command)}: config error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle.replace("lr:", "max_wait_ms:") in err if command == ["serve"] else needle in err


def test_a_config_error_of_the_handler_exits_2(capsys):
    def handler(cfg: Root) -> int:
        raise ConfigError(f"data file {cfg.name!r} does not exist")

    assert run_command(Root, ["--name", "x.txt"], handler, prog="t") == 2
    assert capsys.readouterr().err == "t: config error: data file 'x.txt' does not exist\n"
    assert run_command(Root, ["--steps", "3"], lambda cfg: cfg.steps, prog="t") == 3
    assert run_command(Root, [], lambda cfg: None, prog="t") == 0


def test_version_and_unknown_commands(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"asymkd {__version__}\n"
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in ("serve", "train", "run", "cache", "plan"))
    for argv, needle in (
        (["cache"], "a command is needed"),
        (["cache", "read", "x"], "unknown command 'read'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "asymkd cache write --config" in err


def test_cache_info_needs_one_cache_folder(tmp_path, capsys):
    assert main(["cache", "info"]) == 2
    assert "takes one folder" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asymkd cache info: config error: ") and "is not a teacher cache" in err
