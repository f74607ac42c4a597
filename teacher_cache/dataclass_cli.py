"""Command lines generated from configuration dataclasses: the one generator of every command.

`add_fields` adds one flag per field (`seq_len` -> `--seq-len`; the fields of a nested dataclass
flattened beside its parent's), with the help in the field's metadata (`option`) and the type of
its resolved annotation: bool -> `--x/--no-x`, Literal -> choices, list[T] -> one or more values,
dict[str, T] -> a repeatable KEY=VALUE (values parsed as JSON where they parse, unless T is str),
T | None -> T. No flag has an argparse default, so `from_args` can layer the values: the field
defaults, then the `--config FILE` (TOML, JSON or YAML; keys named as the fields,
a nested dataclass as a table), then the flags given. A JSON file may hold the configuration
under a `config` key beside other records, as a cache's build.json does. Validation stays in the
dataclasses' __post_init__.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from teacher_cache.errors import ConfigError, one_line

# The namespace attribute holding what from_args needs to know about the parser's fields.
FIELDS_DEST = "_dataclass_fields"
CONFIG_FLAG = "--config"
CONFIG_KEY = "config"  # a JSON record's member holding the configuration (a cache's build.json)


def option(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field and its flag: `help`, and optionally `flag` (its name, if not the
    field's) and `metavar`. A list, dict or dataclass default is copied for each instance."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A field that is not a dataclass: one flag. `dest`: its dotted path from the top class."""

    dest: str
    field: dataclasses.Field
    hint: Any

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag", "--" + self.field.name.replace("_", "-"))

    @property
    def default(self) -> Any:
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return self.field.default

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def leaves(cls: type, prefix: str = "") -> Iterator[Leaf]:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield Leaf(prefix + f.name, f, hints[f.name])


@dataclasses.dataclass(frozen=True)
class _Fields:
    cls: type
    skip: tuple[str, ...]
    only: tuple[str, ...] | None
    defaults: Mapping[str, Any]  # this command's own defaults of some fields, by dest
    config_file: bool

    def leaves(self) -> list[Leaf]:
        return [leaf for leaf in leaves(self.cls) if leaf.dest not in self.skip
                and (self.only is None or leaf.dest in self.only)]


def add_fields(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
               only: tuple[str, ...] | None = None, defaults: Mapping[str, Any] | None = None,
               config_file: bool = True) -> None:
    """One flag per field of `cls` (or of those in `only`) but those in `skip` (dotted paths);
    `defaults` replaces some fields' defaults for this command; `config_file` adds
    `--config FILE`."""
    spec = _Fields(cls, skip, only, dict(defaults or {}), config_file)
    for leaf in spec.leaves():
        default = spec.defaults.get(leaf.dest, leaf.default)
        parser.add_argument(leaf.flag, dest=leaf.dest, default=argparse.SUPPRESS,
                            help=_help(leaf, default), **_argument(leaf))
    if config_file:
        parser.add_argument(CONFIG_FLAG, metavar="FILE",
                            help="read the settings from this TOML, JSON or YAML file (keys as the "
                                 "flags with _ for -, e.g. seq_len; a written config.json or "
                                 "build.json works too); flags given override it (default: none)")
    parser.set_defaults(**{FIELDS_DEST: spec})


def from_args(args: argparse.Namespace, **fixed: Any) -> Any:
    """The dataclass of the parser's fields: defaults, then --config, then the flags given, then
    `fixed` (top-level fields)."""
    spec: _Fields = getattr(args, FIELDS_DEST)
    values = dict(spec.defaults)
    if path := getattr(args, CONFIG_FLAG.lstrip("-"), None):
        values |= read_config(path, spec)
    for leaf in spec.leaves():
        if hasattr(args, leaf.dest):
            given = getattr(args, leaf.dest)
            values[leaf.dest] = ({**(values.get(leaf.dest) or {}), **given}
                                 if isinstance(given, dict) else given)
    missing = [leaf.flag for leaf in spec.leaves()
               if leaf.required and leaf.dest not in values and leaf.dest not in fixed]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required"
                        + (f" (as a flag or in {CONFIG_FLAG} FILE)" if spec.config_file else ""))
    return _build(spec.cls, values, fixed)


def _build(cls: type, values: Mapping[str, Any], fixed: Mapping[str, Any] | None = None,
           prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        dest = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, prefix=dest + ".")
        elif dest in values:
            kwargs[f.name] = values[dest]
    return cls(**(kwargs | dict(fixed or {})))


def read_config(path: str, spec: _Fields) -> dict[str, Any]:
    """The settings of a TOML, JSON or YAML file, checked against the command's fields, by dest."""
    where = f"{CONFIG_FLAG} {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"{where}: cannot read it ({reason})") from None
    suffix = Path(path).suffix
    if suffix in (".yaml", ".yml"):
        data = _read_yaml(text, where)
    elif suffix in (".toml", ".json"):
        try:
            data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where}: not valid {suffix[1:].upper()} ({one_line(e)})") from None
    else:
        raise ConfigError(f"{where}: expected a .toml, .json or .yaml file")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(spec.cls)}
    if isinstance(data.get(CONFIG_KEY), dict) and CONFIG_KEY not in names:
        data = data[CONFIG_KEY]
    return _flatten(data, spec.cls, where, {leaf.dest for leaf in spec.leaves()})


def _read_yaml(text: str, where: str) -> Any:
    import yaml  # pyyaml, a dependency of huggingface_hub: imported only for a YAML file

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({one_line(e)})") from None


def _flatten(data: Mapping[str, Any], cls: type, where: str, dests: set[str],
             prefix: str = "") -> dict[str, Any]:
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)
             if prefix + f.name in dests or any(d.startswith(f"{prefix}{f.name}.") for d in dests)}
    out = {}
    for key, value in data.items():
        dest = prefix + key
        if key not in known:
            raise ConfigError(f"{where}: unknown key {dest!r}; known keys: "
                            f"{', '.join(sorted(prefix + k for k in known))}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: key {dest!r}: expected a table, got {value!r}")
            out |= _flatten(value, hints[key], where, dests, dest + ".")
        else:
            out[dest] = _checked(value, hints[key], f"{where}: key {dest!r}")
    return out


def _checked(value: Any, hint: Any, where: str) -> Any:
    """`value` as of type `hint`, or a ConfigError naming `where`."""
    inner, optional = _unwrap_optional(hint)
    origin, args = get_origin(inner), get_args(inner)
    ok = value is None and optional
    if inner is Any:
        ok = True
    elif inner is bool:
        ok = ok or isinstance(value, bool)
    elif inner is int:
        ok = ok or (isinstance(value, int) and not isinstance(value, bool))
    elif inner is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif inner is str:
        ok = ok or isinstance(value, str)
    elif origin is Literal:
        if not ok and value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        ok = True
    elif origin is list and isinstance(value, list):
        return [_checked(item, args[0], where) for item in value]
    elif origin is dict and isinstance(value, dict):
        return {str(k): _checked(v, args[1], where) for k, v in value.items()}
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(inner)}, got {value!r}")
    return value


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, else (hint, False)."""
    args = get_args(hint)
    if get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a table"
    return getattr(hint, "__name__", str(hint))


def _argument(leaf: Leaf) -> dict[str, Any]:
    """add_argument's settings of a field's type."""
    inner, _ = _unwrap_optional(leaf.hint)
    origin, args = get_origin(inner), get_args(inner)
    metavar = {"metavar": leaf.field.metadata.get("metavar", leaf.field.name.upper())}
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": args, "type": type(args[0])}
    if origin is list:
        return {"nargs": "+", "type": _scalar(args[0], leaf), **metavar}
    if origin is dict:
        return {"action": KeyValue, "values_are_text": args[1] is str, **metavar}
    return {"type": _scalar(inner, leaf), **metavar}


def _scalar(hint: Any, leaf: Leaf) -> type:
    if hint in (int, float, str):
        return hint
    raise TypeError(f"{leaf.dest}: no flag for a field of type {hint}")


def _help(leaf: Leaf, default: Any) -> str:
    """The field's help and, where it says something and the help does not say it already, its
    default; % escaped for argparse."""
    text = leaf.field.metadata["help"].replace("%", "%%")
    if leaf.required or default is None or default in ([], {}) or "default" in text:
        return text
    if isinstance(default, bool):
        shown = leaf.flag if default else "--no-" + leaf.flag.removeprefix("--")
    elif isinstance(default, list):
        shown = " ".join(map(str, default))
    else:
        shown = str(default)
    return f"{text} (default: {shown.replace('%', '%%')})"


class KeyValue(argparse.Action):
    """A repeatable KEY=VALUE into a dict; values are JSON where they parse, unless
    `values_are_text`."""

    def __init__(self, *args: Any, values_are_text: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.values_are_text = values_are_text

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 text: Any, option_string: str | None = None) -> None:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            parser.error(f"argument {option_string}: expected KEY=VALUE, got {text!r}")
        pairs = dict(getattr(namespace, self.dest, None) or {})
        pairs[key.strip()] = value.strip() if self.values_are_text else _json_or_text(value)
        setattr(namespace, self.dest, pairs)


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
