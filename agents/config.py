"""One config schema for Python and the CLI: dataclass fields <-> argparse options (as TRL's HfArgumentParser).

Each learner declares its hyperparameters as a dataclass; every field carries `metadata={"help": ...}`. The CLI gets
one `--field-name` option per field (help text and default from the field) and a generic `--set key=value`.

    @dataclass
    class MyConfig:
        lr: float = field(default=1e-4, metadata={"help": "Adam learning rate."})

    add_dataclass_arguments(parser, MyConfig)
    cfg = dataclass_from_args(MyConfig, parser.parse_args())
    cfg = apply_overrides(cfg, ["lr=3e-4"])

Hand-written rather than HfArgumentParser because we add options to an existing sub-parser (next to `--agent`,
`--task`, ...) and also need `key=value` overrides and JSON round trips.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def _field_types(cls: type) -> dict[str, Any]:
    # Resolves string annotations (from __future__ import annotations) to real types.
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_value(text: str, tp: Any) -> Any:
    """Convert a command-line string to a field's type (bool, int, float, str, Literal, list[...], Optional)."""
    inner, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(inner)
    if inner is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if inner in (int, float, str):
        return inner(text)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        for choice in choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"expected one of {list(choices)}, got {text!r}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(inner) or (str,)
        stripped = text.strip()
        if stripped.startswith("["):
            items = json.loads(stripped)
            return origin(parse_value(str(v), item_tp) for v in items)
        return origin(parse_value(v.strip(), item_tp) for v in stripped.split(",") if v.strip())
    if origin is dict or inner is dict:
        return json.loads(text)
    if inner is Any:
        return text
    raise TypeError(f"cannot parse a command-line value into {tp!r}")


def option_name(field_name: str, prefix: str = "") -> str:
    return "--" + (prefix + field_name).replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                            prefix: str = "", skip: set[str] | frozenset[str] = frozenset(),
                            dest_prefix: str | None = None) -> None:
    """Add one option per dataclass field. Defaults are left as None so only options the user gave override.

    `prefix` prefixes option names (and destinations); `dest_prefix` overrides only the destinations, keeping
    option names plain while avoiding clashes with other options in the namespace.
    """
    dest_prefix = prefix if dest_prefix is None else dest_prefix
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = hints[f.name]
        default = _default_of(f)
        shown = "" if default is _MISSING else f" (default: {default!r})"
        parser.add_argument(
            option_name(f.name, prefix),
            dest=dest_prefix + f.name,
            default=None,
            type=lambda s, tp=tp: parse_value(s, tp),
            metavar=_metavar(tp),
            help=(field_help(f) + shown).replace("%", "%%"),
        )


def _metavar(tp: Any) -> str:
    inner, _ = _unwrap_optional(tp)
    if typing.get_origin(inner) is typing.Literal:
        return "{" + ",".join(str(c) for c in typing.get_args(inner)) + "}"
    return getattr(inner, "__name__", "VALUE").upper()


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def dataclass_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "",
                        base: T | None = None) -> T:
    """Build `cls` from parsed options (those left at None keep `base`'s or the dataclass default)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        given = getattr(args, prefix + f.name, None)
        if given is not None:
            values[f.name] = given
    return cls(**values)


def apply_overrides(config: T, overrides: list[str] | None) -> T:
    """Return a copy of `config` with `key=value` strings applied (typed by the field); unknown keys are errors."""
    if not overrides:
        return config
    hints = _field_types(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in names:
            raise ValueError(f"unknown config key {key!r} for {type(config).__name__}; known: {sorted(names)}")
        try:
            changes[key] = parse_value(value, hints[key])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad value for {key}: {exc}") from exc
    return dataclasses.replace(config, **changes)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True, default=str) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    """Load a config saved by `save_config`; unknown keys are dropped so older files keep loading."""
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    values = {}
    for key, value in data.items():
        if key in names:
            inner, _ = _unwrap_optional(hints[key])
            if typing.get_origin(inner) is tuple and isinstance(value, list):
                value = tuple(value)
            values[key] = value
    return cls(**values)


def describe_config(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, help) for each field: for docs and `--help` listings."""
    return [(f.name, repr(_default_of(f)), field_help(f)) for f in dataclasses.fields(cls)]


def replace_directory(staged: Path, directory: Path) -> None:
    """Move the fully written `staged` directory to `directory`, replacing what is there: a crash mid-save never
    leaves a half-written checkpoint in place (at worst the previous one survives as `<name>.old`)."""
    import shutil

    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
        staged.rename(directory)
        shutil.rmtree(old)
    else:
        staged.rename(directory)
