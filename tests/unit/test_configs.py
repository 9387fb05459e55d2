"""Config loading: defaults < YAML < CLI, unknown keys and bad values rejected with the key path named."""

from dataclasses import dataclass, field

import pytest

from asymkd.configs import ConfigError, describe_fields, dump_config, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Root:
    name: str = "run"
    steps: int = 10
    fsdp: bool = False
    tag: str | None = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_then_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(Root, p, ["--optim.lr", "3e-4", "--fsdp", "--name=abc"])
    assert cfg.steps == 20 and cfg.optim.lr == pytest.approx(3e-4) and cfg.fsdp is True
    assert cfg.optim.betas == [0.9, 0.95]


def test_dashes_and_numeric_strings():
    cfg = load_config(Root, None, ["--name", "123", "--tag=7"])
    assert cfg.name == "123" and cfg.tag == "7"


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'"):
        load_config(Root, p)
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        load_config(Root, None, ["--stepz", "3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        load_config(Root, None, ["--steps", "many"])
    with pytest.raises(ConfigError, match="fsdp: expected true/false"):
        load_config(Root, None, ["--fsdp", "3"])


def test_post_init_validation_surfaces_as_config_error():
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load_config(Root, None, ["--optim.lr", "-1"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(Root, None, ["--steps", "5", "--optim.lr", "0.5"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Root, tmp_path / "resolved.yaml") == cfg


def test_describe_lists_nested_flags():
    flags = [row[0] for row in describe_fields(Root)]
    assert "--optim.lr" in flags and "--steps" in flags
