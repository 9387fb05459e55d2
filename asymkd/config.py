"""The one config loader of every `asymkd` command: a root dataclass from YAML + flags, on jsonargparse.

Values come from, lowest first: the dataclass defaults, the YAML file of `--config FILE` (wherever it is in
argv), then `--section.key value` / `--section.key=value` flags. Dashes and underscores are interchangeable
in keys; booleans are `true`/`false` (a bare `--flag` is true); lists and dicts are YAML (`--teacher.targets '[a:1, b:2]'`). Unknown
keys are rejected; `--help` lists every key with its type, default and description (the attribute
docstrings of the dataclasses).

    cfg = load_config(TrainConfig, "run.yaml", ["--optim.lr", "3e-4"])      # programmatic
    cfg = parse_args(TrainConfig, sys.argv[1:], prog="asymkd train")         # a command line
    dump_config(cfg, run_dir / "config.yaml")                               # what actually ran
    sys.exit(run_command(TrainConfig, argv, handler, prog="asymkd train"))  # help, errors -> exit 2

Every mistake is a ConfigError with a one-line message naming the key (a YAML syntax error names
`FILE:LINE:COL`); `run_command` prints it as `<prog>: config error: <message>` and returns 2.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
    set_parsing_settings,
)

T = TypeVar("T")
_HELP = ("-h", "--help")
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true/false",
    "str": "a string",
    "list": "a list",
}


class ConfigError(ValueError):
    """A config key or value that is not accepted; the message is one line naming the key."""


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help (type, default, description); an empty string default shows as \"\"."""

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        return text.replace("default: %(default)s", 'default: ""') if action.default == "" else text

    def format_help(self) -> str:
        """Flags as users type them (`--max-wait-ms`); both spellings are accepted."""
        return re.sub(r"--[\w.]+", lambda m: m[0].replace("_", "-"), super().format_help())


def _build_parser(cls: type, prog: str) -> ArgumentParser:
    """The jsonargparse parser of `cls`: `--config FILE` + one flag per leaf key."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog=prog, exit_on_error=False, formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of the keys below")
    parser.add_class_arguments(cls)
    return parser


def parse_args(cls: type[T], argv: list[str], *, prog: str) -> T:
    """`--config FILE` anywhere in argv plus flags -> `cls`; raises ConfigError naming the key."""
    parser = _build_parser(cls, prog)
    argv = _bare_booleans(_config_first([_normalize_key(a) for a in argv]), parser)
    try:
        ns = parser.parse_args(argv)
    except Exception as e:  # jsonargparse raises ArgumentError / ValueError / TypeError on bad input
        raise ConfigError(_one_line(str(e))) from None
    return _instantiate(cls, parser, ns)


def load_config(cls: type[T], yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from its defaults < the YAML file < overrides (flags); raises ConfigError."""
    argv = ["--config", str(yaml_path)] if yaml_path else []
    return parse_args(cls, [*argv, *(overrides or [])], prog=cls.__name__)


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what actually ran) as YAML; `load_config` reads it back unchanged."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def run_command(cls: type[T], argv: list[str], handler: Callable[[T], int | None], *, prog: str) -> int:
    """`--help` -> the help (0); a ConfigError, from parsing or from the handler -> one line on stderr (2);
    else the handler's exit code (None = 0)."""
    if any(a in _HELP for a in argv):
        _build_parser(cls, prog).print_help()
        return 0
    try:
        return int(handler(parse_args(cls, argv, prog=prog)) or 0)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------ argv
def _normalize_key(arg: str) -> str:
    """`--max-wait-ms=5` -> `--max_wait_ms=5`: jsonargparse keys are the field names; values are untouched."""
    if not arg.startswith("--") or arg in _HELP:
        return arg
    key, eq, value = arg[2:].partition("=")
    return f"--{key.replace('-', '_')}{eq}{value}"


def _bare_booleans(argv: list[str], parser: ArgumentParser) -> list[str]:
    """A boolean key given without a value (`--vllm.enforce-eager`) means true, as it always has."""
    flags = {
        option
        for action in parser._actions
        if getattr(action, "_typehint", None) in (bool, bool | None)
        for option in action.option_strings
    }
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg in flags and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            out.append("true")
    return out


def _config_first(argv: list[str]) -> list[str]:
    """Move every `--config FILE` to the front (flags override the file wherever it is); check each file."""
    files, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config needs a YAML file")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            files.append(arg.partition("=")[2])
        else:
            rest.append(arg)
        i += 1
    front = []
    for path in files:
        if _read_yaml(path) is not None:  # an empty file sets nothing
            front += ["--config", path]
    return front + rest


def _read_yaml(path: str) -> Any:
    """Pre-read a config file for errors jsonargparse cannot locate: missing file, YAML syntax, top level."""
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as e:
        mark, context_mark = e.problem_mark or e.context_mark, e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        context = f" ({e.context}" if e.context else ""
        if context and context_mark and context_mark is not mark:
            context += f" from {context_mark.line + 1}:{context_mark.column + 1}"
        context += ")" if context else ""
        raise ConfigError(f"{where}: {e.problem}{context}") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {_one_line(str(e))}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ instantiate
def _instantiate(cls: type[T], parser: ArgumentParser, ns: Namespace) -> T:
    """Sections first (jsonargparse), then the root; a `__post_init__` error names its section."""
    failed: list[tuple[type, dict[str, Any], Exception]] = []

    def build(section: type, *args: Any, **kwargs: Any) -> Any:
        try:
            return section(*args, **kwargs)
        except (ValueError, TypeError) as e:
            failed.append((section, kwargs, e))  # a Union type hint would swallow it into its own message
            raise

    _check_sections(cls, ns)
    try:
        built = parser.instantiate(ns, instantiators=[(build, object, True)])
    except Exception as e:
        if not failed:
            raise ConfigError(_one_line(str(e))) from None
        section, kwargs, error = failed[-1]  # the one that stopped it (a Union may have tried others)
        path = _section_path(cls, section, kwargs, ns)
        raise ConfigError(f"{path}: {_one_line(str(error))}" if path else _one_line(str(error))) from None
    values = {k: v for k, v in vars(built).items() if k != "config" and not k.startswith("__")}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # cross-section checks of the root
        raise ConfigError(_one_line(str(e))) from None


def _check_sections(cls: type, ns: Namespace, prefix: str = "") -> None:
    """A section given a value that is no mapping (`optim: [1, 2]`) is named before anything is built."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):  # a plain section (a Union one is checked by its type)
            key = f"{prefix}{f.name}"
            if not isinstance(ns.get(key), Namespace):
                raise ConfigError(f"{key}: expected a mapping of {key} keys, got {ns.get(key)!r}")
            _check_sections(hints[f.name], ns, f"{key}.")


def _dataclass_types(tp: Any) -> list[type]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return [tp] if dataclasses.is_dataclass(tp) else []


def _section_paths(cls: type, section: type, prefix: str = "") -> list[str]:
    """Every key path at which `section` sits in the tree of `cls` ("" = the root itself)."""
    paths = [prefix.rstrip(".")] if cls is section else []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for sub in _dataclass_types(hints[f.name]):
            paths += _section_paths(sub, section, f"{prefix}{f.name}.")
    return paths


def _section_path(cls: type, section: type, kwargs: dict[str, Any], ns: Namespace) -> str:
    """The key path of the section that failed; when a class sits at several, the one with these values."""
    paths = _section_paths(cls, section) or [section.__name__]
    for path in paths:
        value = ns.get(path) if path else ns
        if isinstance(value, Namespace) and all(
            value.get(k) == v for k, v in kwargs.items() if not dataclasses.is_dataclass(v)
        ):
            return path
    return paths[0]


# ------------------------------------------------------------------------------------------- messages
def _one_line(message: str) -> str:
    """jsonargparse's multi-line messages -> one line naming the key (the innermost error of a Union)."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))  # outer key, then inner
    # A Union (`in_process: Section | str | None`): the first error is the section's, the one that matters.
    errors = re.split(r"\n\s*- ", message.split("Errors:", 1)[1]) if "Errors:" in message else []
    detail = next((e for e in errors[1:] if not e.startswith("Expected a <class")), None)
    if detail is not None:
        message = detail.split("Given value type:")[0]
    message = re.sub(r'Parser key "[^"]+":\s*', "", message)
    message = re.sub(r"Problem with given class_path '[^']+':\s*", "", message)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    message = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", message)
    message = re.sub(
        r"Expected a (?:typing\.)?Literal\[(.*)\]\. Got value: (.*)", r"'\2' is not one of [\1]", message
    )
    message = re.sub(
        r"Expected a ([\w\[\], |]+)\. Got value: (.*)",
        lambda m: f"expected {_TYPE_WORDS.get(m[1], m[1])}, got '{m[2]}'",
        message,
    )
    message = re.sub(
        r"Unable to load config '([^']*)'.*", r"expected a mapping of keys or a YAML file, got '\1'", message
    )
    key = ".".join(keys)
    unknown = re.search(
        r"Group '([^']+)' does not accept option '([^']+)'|Option '([^']+)' is not accepted", message
    )
    if unknown:
        group, option, top = unknown.groups()
        name = ".".join(p for p in (key, group, option or top) if p)
        return f"unknown config key '{name}'"
    extra = re.match(r"unrecognized arguments: (.*)", message)
    if extra:
        names = [f"'{a[2:].partition('=')[0]}'" for a in extra.group(1).split() if a.startswith("--")]
        if names:
            return f"unknown config key {', '.join(names)}"
        return f"unexpected argument(s) {extra.group(1)!r}: keys are given as --key value"
    return f"{key}: {message}" if key else message
