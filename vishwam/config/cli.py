"""Command line: a YAML file, then tyro flags, into a :class:`~vishwam.config.sections.RunConfig`.

Precedence is dataclass defaults < YAML (`--config PATH`) < flags. The YAML is read strictly: an unknown key, a
duplicate key or an ill-typed value is a `ConfigError` naming the dotted key and the file. The result is the
default instance of `tyro.cli`, so every YAML key is also a flag (`--training.max-steps 20`, or
`--training.max_steps 20`) and `--help` shows the YAML's values as the defaults. The config is validated once,
after the flags, so a flag may fix what the YAML alone gets wrong. Paths in the YAML are kept as written, i.e.
relative to the working directory of the run, not to the YAML file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import io
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import tyro
import yaml

from distill.config import number_problem
from vishwam.config.sections import RunConfig, unvalidated
from vishwam.errors import ConfigError, VishwamError

T = TypeVar("T")

_DESCRIPTION = (
    "Distil a Hugging Face LLM into a smaller student. `--config PATH` reads a YAML file whose keys are the "
    "options below (flags override it); `--debug` shows full tracebacks instead of one-line errors."
)


@dataclasses.dataclass(frozen=True)
class CliOptions:
    """Options handled before tyro sees the command line."""

    config_path: str | None
    """The YAML file given with `--config`, if any."""
    debug: bool
    """`--debug`: let errors raise with their traceback."""


def parse_args(argv: Sequence[str]) -> tuple[RunConfig, CliOptions]:
    """Build the run config from `--config PATH` and flags.

    **Arguments:**

    - `argv`: the command line without the program name (`sys.argv[1:]`).

    **Returns:** the validated `RunConfig` and the `CliOptions`.

    Raises `ConfigError` for a bad file, key, value or flag (tyro's message, on one line); `--help` prints the
    help and exits 0.
    """
    config_path, debug, rest = _split_argv(list(argv))
    rest = _normalize_bools(rest)
    raw = _load_yaml(config_path) if config_path is not None else {}
    source = config_path if config_path is not None else "the defaults"
    with unvalidated():
        default = _build(RunConfig, raw, "", source)
        cfg = _tyro(default, rest)
    try:
        cfg.validate()
    except ConfigError as error:
        key = getattr(error, "key", None)
        if config_path is not None and key is not None and not _in_flags(rest, key):
            located = ConfigError(f"{error} (in {config_path})")
            located.key = key  # type: ignore[attr-defined]
            raise located from None
        raise
    return cfg, CliOptions(config_path=config_path, debug=debug)


def _tyro(default: RunConfig, args: list[str]) -> RunConfig:
    """`tyro.cli` over `args`; a bad flag becomes a one-line `ConfigError` instead of tyro's boxed message."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(RunConfig, default=default, args=args, description=_DESCRIPTION,
                            config=(tyro.conf.FlagConversionOff,))  # booleans take a value, as in YAML
    except SystemExit as exit_:
        if not exit_.code:  # --help
            sys.stderr.write(captured.getvalue())
            raise
        raise ConfigError(_one_line(captured.getvalue())) from None


def parse_flags(cls: type[T], argv: Sequence[str], description: str) -> T:
    """A tool's flags (a frozen dataclass `cls`) from `argv` through tyro, a bad flag a one-line `ConfigError`
    (`--debug` is left to `run_main`): also a number that is NaN or infinite, or an integer past 32 bits."""
    captured = io.StringIO()
    args = [a for a in argv if a != "--debug"]
    try:
        with contextlib.redirect_stderr(captured):
            flags = tyro.cli(cls, args=args, description=description)  # booleans are flags: --chat
    except SystemExit as exit_:
        if not exit_.code:  # --help
            sys.stderr.write(captured.getvalue())
            raise
        raise ConfigError(_one_line(captured.getvalue())) from None
    for field in dataclasses.fields(flags):  # type: ignore[arg-type]
        problem = number_problem(getattr(flags, field.name))  # NaN, inf, integers past 32 bits: every flag
        if problem is not None:
            raise ConfigError(f"--{field.name.replace('_', '-')} {problem}")
    return flags


def _one_line(box: str) -> str:
    """tyro's error box as one line: its message, and the flag it names or suggests (`--training.max-steps INT`)."""
    rows = [line.strip("│╭╮╰╯ \t") for line in box.splitlines()]
    sections: list[list[str]] = [[]]
    for row in rows:
        if row and set(row) <= {"─"}:
            sections.append([])
        elif row and not row.startswith("─"):
            sections[-1].append(row)
    message = " ".join(sections[0]).rstrip(".") or "bad command-line flags"
    hint = next((row.split("  ")[0] for section in sections[1:] for row in section if row.startswith("--")), None)
    if hint is not None and hint.split()[0] not in message:
        message += f"; did you mean {hint}?"
    elif hint is not None:
        message += f" (expected {hint})"
    return message


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The config of `python run.py --config PATH *overrides`, for notebooks and tests."""
    return parse_args(["--config", path, *overrides])[0]


def run_main(main_fn: Callable[[list[str]], T], argv: Sequence[str] | None = None) -> T:
    """Call `main_fn(argv)`, turning a user error into one line on stderr and exit status 2.

    With `--debug` in `argv` errors propagate with their traceback. Ctrl-C exits with status 130.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return main_fn(argv)
    except VishwamError as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------ the argv


def _split_argv(argv: list[str]) -> tuple[str | None, bool, list[str]]:
    config_path: str | None = None
    debug = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--debug":
            debug = True
        elif arg == "--config" or arg.startswith("--config="):
            if config_path is not None:
                raise ConfigError("--config is given more than once")
            if arg == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("--config needs a YAML file path")
                i += 1
                config_path = argv[i]
            else:
                config_path = arg.split("=", 1)[1]
            if not config_path:
                raise ConfigError("--config needs a YAML file path")
        elif arg == "--":
            rest.extend(argv[i:])
            break
        else:
            rest.append(arg)
        i += 1
    return config_path, debug, rest


@functools.cache
def _bool_keys(cls: type = RunConfig, prefix: str = "") -> frozenset[str]:
    """Dotted keys of every boolean field of the config."""
    keys: set[str] = set()
    for name, tp in _hints(cls).items():
        if tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp)):
            keys.add(prefix + name)
        elif dataclasses.is_dataclass(tp):
            keys |= _bool_keys(tp, f"{prefix}{name}.")
    return frozenset(keys)


_BOOL_WORDS = {"true": "True", "yes": "True", "on": "True", "1": "True",
               "false": "False", "no": "False", "off": "False", "0": "False"}


def _normalize_bools(rest: list[str]) -> list[str]:
    """Boolean flags take the values YAML takes (`--training.remat true`); tyro wants `True`/`False`. A bare
    `--training.remat` means true and `--training.no-remat` false."""
    out: list[str] = []
    for i, arg in enumerate(rest):
        if arg.startswith("--") and "=" not in arg:
            name = arg[2:].replace("-", "_")
            head, dot, last = name.rpartition(".")
            negated = head + dot + last[3:] if last.startswith("no_") else None
            bare = i + 1 == len(rest) or rest[i + 1].startswith("--")
            if name in _bool_keys() and bare:
                out += [arg, "True"]
                continue
            if negated in _bool_keys() and name not in _bool_keys():
                out += ["--" + negated, "False"]
                continue
        out.append(arg)
    for i, arg in enumerate(out):
        key = _flag_key(arg)
        if key in _bool_keys() and "=" not in arg and i + 1 < len(out) and out[i + 1].lower() in _BOOL_WORDS:
            out[i + 1] = _BOOL_WORDS[out[i + 1].lower()]
        elif arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            if _flag_key(flag) in _bool_keys() and value.lower() in _BOOL_WORDS:
                out[i] = f"{flag}={_BOOL_WORDS[value.lower()]}"
    return out


def _flag_key(arg: str) -> str | None:
    if not arg.startswith("--"):
        return None
    name = arg[2:].split("=", 1)[0]
    if name.startswith("no-") or name.startswith("no_"):  # tyro's boolean negation
        name = name[3:]
    return name.replace("-", "_")


def _in_flags(rest: Sequence[str], key: str) -> bool:
    key = re.sub(r"(\[\d+\])+$", "", key)  # `pairs[0][1]` is set by the flag `pairs`
    return any(_flag_key(arg) == key for arg in rest)


# ----------------------------------------------------------------------------------------------- the YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"invalid YAML in config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


# -------------------------------------------------------------------------------- YAML data -> dataclasses


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an int", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _build(cls: type[T], data: Any, prefix: str, source: str) -> T:
    """A dataclass from YAML data; missing required fields become `tyro.MISSING` (tyro then asks for a flag)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"config key '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{where} in {source} must be a mapping, got {_describe(data)}")
    hints = _hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}' in {source}{hint}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if name in data:
            kwargs[name] = _convert(data[name], tp, key, source)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs[name] = _build(tp, {}, key, source) if dataclasses.is_dataclass(tp) else tyro.MISSING
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"ill-typed config key '{key}' in {source}: expected {_type_name(tp)}, "
                           f"got {_describe(value)}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if value is None:
            raise bad()
        for option in options:
            try:
                return _convert(value, option, key, source)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise bad()
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            if isinstance(value, str) and args[0] is str:  # `train: a.jsonl` means `train: [a.jsonl]`
                return (value,)
            if not isinstance(value, list):
                raise bad()
            return tuple(_convert(item, args[0], f"{key}[{i}]", source) for i, item in enumerate(value))
        if not isinstance(value, list) or len(value) != len(args):
            raise bad()
        return tuple(_convert(item, arg, f"{key}[{i}]", source) for i, (item, arg) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"config field '{key}' has a type the YAML reader does not handle: {tp!r}")
