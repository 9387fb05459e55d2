"""Dataclass configs from YAML + command-line overrides, unknown keys rejected.

Every component has one root dataclass made of nested section dataclasses. Values come from, lowest first:
the dataclass defaults, a YAML file, then `--section.key value` / `--section.key=value` flags (a bare
`--flag` sets a bool to true; dashes and underscores are interchangeable in keys).

    cfg = load_config(TrainConfig, "run.yaml", ["--optim.lr", "3e-4", "--parallel.fsdp=true"])
    dump_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that is not accepted; the message names the key path."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{path}'; {cls.__name__} accepts: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ validation
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"{cls.__name__}{where}: {e}") from e


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`["--a.b", "1", "--c=x", "--flag"]` -> nested `{"a": {"b": 1}, "c": "x", "flag": True}`."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"
        i += 1
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = [p.replace("-", "_") for p in key.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: '{p}' is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        k = k.replace("-", "_")
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _coerce_override_strings(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """YAML parses `--model 123` as an int; keep it a string where the field is a string."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp, _ = _strip_optional(hints.get(k.replace("-", "_"), Any))
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _coerce_override_strings(tp, v)
        elif tp is str and isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        out[k] = v
    return out


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from defaults < YAML file < overrides; raises ConfigError naming the bad key."""
    data: dict[str, Any] = {}
    if yaml_path:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: the top level must be a mapping")
        data = loaded
    if overrides:
        data = _merge(data, _coerce_override_strings(cls, parse_overrides(overrides)))
    return _build(cls, data)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_fields(cls: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(flag, type name, default) for every leaf field, for `--help` output."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, f"{name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f"--{name.replace('_', '-')}", getattr(tp, "__name__", str(tp)), default))
    return rows
