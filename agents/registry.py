"""The one agent registry and the one way to build an agent, for `etpo train`, `etpo bench` and Python.

    agent = build_agent("etpo", seed=0, model="tiny", overrides=["lr=3e-4"])
    agent = build_agent("my_pkg.my_module:MyAgent", seed=1)
    agent = build_agent(lambda obs: "return LogisticRegression().fit(X, y)")

An agent spec is a built-in name (`AGENTS`), a `module:Class` string, a class, or a plain callable `obs -> str`
(wrapped by `as_agent`). A class with a config dataclass (`config_class`, or the annotation of `config=` in its
`__init__`) is built as `cls(model=..., config=...)`: the config gets `seed` (when it has such a field) and then the
overrides, typed by the field (`agents.config`). A class without one is called with those of `seed` and `model` its
constructor names (both when it takes `**kwargs`); it takes no overrides.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agents.base import as_agent
from agents.config import apply_overrides, leaf_fields, parse_value, with_fields

# name -> "module:Class"; modules load on first use so `etpo --version` stays fast.
AGENTS: dict[str, str] = {
    "etpo": "agents.etpo:ETPOAgent",
    "ppo": "agents.ppo:PPOAgent",
    "grpo": "agents.grpo:GRPOAgent",
    "sft": "agents.sft:SFTAgent",
    "prompting": "agents.prompting:PromptingAgent",
    "zero-shot": "agents.prompting:ZeroShotPromptingAgent",
    "few-shot": "agents.prompting:FewShotPromptingAgent",
    "random": "agents.base:RandomProgramAgent",
    "scripted": "agents.base:ScriptedAgent",
}

Overrides = Iterable[str] | Mapping[str, Any] | None


def resolve_agent_class(spec: str) -> Any:
    """The class (or callable) named by a registry name (`etpo`, `random`, ...) or a `package.module:Class` spec."""
    target = AGENTS.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown agent {spec!r}: use one of {', '.join(sorted(AGENTS))} or 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise ValueError(f"{module_name!r} has no attribute {attr!r} (from agent spec {spec!r})") from exc
    return obj


def config_class_of(cls: Any) -> type | None:
    """The config dataclass of an agent class: its `config_class`, else the annotation of `__init__(config=...)`."""
    explicit = getattr(cls, "config_class", None)
    if explicit is not None or not inspect.isclass(cls):
        return explicit
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: the class simply has no config
        return None
    tp = hints.get("config")
    for candidate in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def config_class_for(spec: Any) -> type | None:
    """`config_class_of` for any agent spec (a name, `module:Class`, a class or a callable)."""
    return config_class_of(resolve_agent_class(spec) if isinstance(spec, str) else spec)


def config_keys(config_cls: type | None) -> list[str]:
    """The names `--set` (and `overrides`) accept for a config class: its leaf fields."""
    return sorted(leaf_fields(config_cls)) if config_cls is not None else []


def build_agent(spec: Any, *, seed: int | None = None, model: str | Callable[[], str] = "tiny",
                overrides: Overrides = None, config: Any = None) -> Any:
    """Build one agent from `spec` (see the module docstring).

    `model` is a path, a hub name, `"tiny"`, or a thunk returning one (so a model is only resolved when the agent
    takes one). `config` replaces the class's default config; `overrides` (`["key=value", ...]` or `{key: value}`)
    apply on top, after `seed`. An unknown key raises ValueError listing the valid ones.
    """
    target = resolve_agent_class(spec) if isinstance(spec, str) else spec
    if not inspect.isclass(target):
        if overrides or config is not None:
            raise ValueError(f"agent {spec!r} is a callable without a config; overrides cannot apply")
        return as_agent(target)
    config_cls = config_class_of(target)
    if config_cls is None:
        if overrides or config is not None:
            raise ValueError(f"agent {spec!r} declares no config dataclass, so overrides cannot apply")
        return target(**_accepted(target, seed=seed, model=model))
    config = make_config(config_cls, seed=seed, overrides=overrides, base=config)
    return target(model=_resolved(model), config=config)


def make_config(config_cls: type, *, seed: int | None = None, overrides: Overrides = None, base: Any = None) -> Any:
    """`base` (default: `config_cls()`) with `seed` set (when the config has a `seed` field), then `overrides`."""
    config = base if base is not None else config_cls()
    leaves = leaf_fields(config_cls)
    if seed is not None and "seed" in leaves:
        config = with_fields(config, {"seed": seed})
    if isinstance(overrides, Mapping):
        unknown = sorted(set(overrides) - set(leaves))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} for {config_cls.__name__}; known: {sorted(leaves)}")
        typed = {key: parse_value(value, leaves[key].type) if isinstance(value, str) else value
                 for key, value in overrides.items()}
        return with_fields(config, typed)
    return apply_overrides(config, list(overrides or []))


def _resolved(model: str | Callable[[], str]) -> str:
    return model() if callable(model) else model


def _accepted(factory: Any, *, seed: int | None, model: str | Callable[[], str]) -> dict[str, Any]:
    """Those of `seed` and `model` that `factory`'s signature names (both when it takes **kwargs)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs: dict[str, Any] = {}
    if seed is not None and (takes_any or "seed" in parameters):
        kwargs["seed"] = seed
    if takes_any or "model" in parameters:
        kwargs["model"] = _resolved(model)
    return kwargs


def options_for(spec: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Those of `options` (learner-config fields by name) that `spec`'s config has; none for an agent without one."""
    if not options:
        return {}
    keys = set(config_keys(config_class_for(spec)))
    return {key: value for key, value in options.items() if key in keys}


def check_options(specs: Iterable[Any], options: Mapping[str, Any]) -> None:
    """Options for several agents (`etpo bench --set`): every key must be a config field of at least one of them,
    and a string value must parse as that field's type for each agent that has it. Raises ValueError naming the
    valid keys per agent. An agent whose class cannot be loaded is left out (its own run reports the error)."""
    if not options:
        return
    leaves: dict[str, dict[str, Any]] = {}
    for spec in specs:
        try:
            config_cls = config_class_for(spec)
        except (ImportError, ValueError, AttributeError):
            continue
        leaves[str(spec)] = leaf_fields(config_cls) if config_cls is not None else {}
    unknown = sorted(set(options) - {key for fields in leaves.values() for key in fields})
    if unknown:
        listing = "; ".join(f"{spec}: {', '.join(sorted(fields)) or '(no config)'}" for spec, fields in leaves.items())
        raise ValueError(f"unknown agent option(s) {unknown}: no agent's config has them. Valid keys: {listing}")
    for spec, fields in leaves.items():
        for key, value in options.items():
            if key in fields and isinstance(value, str):
                try:
                    parse_value(value, fields[key].type)
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"bad value for {key} ({spec}): {exc}") from exc


def is_learner(agent: Any) -> bool:
    return callable(getattr(agent, "learn", None))


__all__ = ["AGENTS", "build_agent", "check_options", "config_class_for", "config_class_of", "config_keys",
           "is_learner", "make_config", "options_for", "resolve_agent_class"]
