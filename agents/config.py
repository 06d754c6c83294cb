"""One config schema for Python and the CLI: dataclass fields <-> argparse options (as TRL's HfArgumentParser).

Each learner declares its hyperparameters as a dataclass; every field carries `metadata={"help": ...}`. A config may
nest another (learner configs compose one `GenerationSettings` as `generation`); its fields are set by their own
names, so the CLI gets one `--field-name` option per leaf field (help text and default from the field) and
`--set key=value` takes the same names. An unknown key is an error that lists the valid ones.

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


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field of a (possibly nested) config: its path from the top, its field and its type."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any


def leaf_fields(cls: type) -> dict[str, Leaf]:
    """Every settable field by its own name, looking through nested dataclass fields (e.g. a learner config's
    `generation: GenerationSettings`): `{"lr": Leaf(("lr",)), "top_p": Leaf(("generation", "top_p")), ...}`.

    A config is set through these flat names on the command line and in `--set`. A nested field whose name is
    taken by an outer one keeps its dotted path as its name (`generation.seed` beside the learner's `seed`).
    """
    hints = _field_types(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    out = {f.name: Leaf((f.name,), f, hints[f.name]) for f in fields if not dataclasses.is_dataclass(hints[f.name])}
    for f in fields:
        if dataclasses.is_dataclass(hints[f.name]):
            for name, leaf in leaf_fields(hints[f.name]).items():
                key = f"{f.name}.{name}" if name in out else name
                out[key] = Leaf((f.name, *leaf.path), leaf.field, leaf.type)
    return out


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                            prefix: str = "", skip: set[str] | frozenset[str] = frozenset(),
                            dest_prefix: str | None = None) -> None:
    """Add one option per (leaf) field. Defaults are left as None so only options the user gave override.

    `prefix` prefixes option names (and destinations); `dest_prefix` overrides only the destinations, keeping
    option names plain while avoiding clashes with other options in the namespace.
    """
    dest_prefix = prefix if dest_prefix is None else dest_prefix
    for name, leaf in leaf_fields(cls).items():
        if name in skip:
            continue
        default = _default_of(leaf.field)
        shown = "" if default is _MISSING else f" (default: {default!r})"
        parser.add_argument(
            option_name(name, prefix),
            dest=dest_prefix + name,
            default=None,
            type=lambda s, tp=leaf.type: parse_value(s, tp),
            metavar=_metavar(leaf.type),
            help=(field_help(leaf.field) + shown).replace("%", "%%"),
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


def with_fields(config: T, changes: dict[str, Any]) -> T:
    """A copy of `config` with flat leaf names set (nested configs are replaced along their path)."""
    leaves = leaf_fields(type(config))
    unknown = sorted(set(changes) - set(leaves))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {type(config).__name__}; known: {sorted(leaves)}")
    return _replace_paths(config, {leaves[name].path: value for name, value in changes.items()})


def _replace_paths(config: T, values: dict[tuple[str, ...], Any]) -> T:
    """Set values given by field path; each nested config is replaced once, with all of its changes together
    (so its validation sees the final combination)."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for (head, *rest), value in values.items():
        if rest:
            nested.setdefault(head, {})[tuple(rest)] = value
        else:
            top[head] = value
    for head, sub in nested.items():
        top[head] = _replace_paths(getattr(config, head), sub)
    return dataclasses.replace(config, **top)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, prefix: str = "",
                        base: T | None = None) -> T:
    """Build `cls` from parsed options (those left at None keep `base`'s or the dataclass default)."""
    given = {name: getattr(args, prefix + name) for name in leaf_fields(cls)
             if getattr(args, prefix + name, None) is not None}
    return with_fields(base if base is not None else cls(), given)


def parse_overrides(cls: type, overrides: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> {leaf name: typed value}; an unknown key or a bad value raises ValueError."""
    leaves = leaf_fields(cls)
    changes: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in leaves:
            raise ValueError(f"unknown config key {key!r} for {cls.__name__}; known: {sorted(leaves)}")
        try:
            changes[key] = parse_value(value, leaves[key].type)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad value for {key}: {exc}") from exc
    return changes


def apply_overrides(config: T, overrides: list[str] | None) -> T:
    """Return a copy of `config` with `key=value` strings applied (typed by the field); unknown keys are errors."""
    if not overrides:
        return config
    return with_fields(config, parse_overrides(type(config), overrides))


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True, default=str) + "\n")


def config_from_dict(cls: type[T], data: dict) -> T:
    """Inverse of `config_to_dict`; unknown keys are dropped so older files keep loading."""
    hints = _field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data or not f.init:
            continue
        value, (inner, _) = data[f.name], _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and isinstance(value, dict):
            value = config_from_dict(inner, value)
        elif typing.get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def load_config(cls: type[T], path: str | Path) -> T:
    """Load a config saved by `save_config` (see `config_from_dict`)."""
    return config_from_dict(cls, json.loads(Path(path).read_text()))


def replace_directory(staged: Path, directory: Path, keep_as: Path | None = None) -> None:
    """Move the fully written `staged` directory to `directory`, replacing what is there: a crash mid-save never
    leaves a half-written checkpoint in place (at worst the previous one survives as `<name>.old`). With `keep_as`,
    the replaced directory is moved there instead of deleted."""
    import shutil

    if not directory.exists():
        staged.rename(directory)
        return
    aside = keep_as or directory.with_name(directory.name + ".old")
    if aside.exists():
        shutil.rmtree(aside)
    directory.rename(aside)
    staged.rename(directory)
    if keep_as is None:
        shutil.rmtree(aside)
