"""Command-line options that `etpo train` and `etpo bench` share: the env's (one per `EnvConfig` field, through the
same dataclass-to-argparse helper as the learner configs) and `--set key=value` (a typed learner-config field)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from agents.config import add_dataclass_arguments, dataclass_from_args
from etpo_env.config import NOT_ON_COMMAND_LINE, EnvConfig

ENV_DEST_PREFIX = "env_"


def add_env_arguments(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()) -> None:
    """An "environment" option group: one option per `EnvConfig` field (`--max-attempts`, `--mode`, ...)."""
    group = parser.add_argument_group("environment (EnvConfig)")
    add_dataclass_arguments(group, EnvConfig, dest_prefix=ENV_DEST_PREFIX, skip=NOT_ON_COMMAND_LINE | skip)


def env_config_from_args(args: argparse.Namespace, **fields: Any) -> EnvConfig:
    """The `EnvConfig` the options describe (options not given keep the defaults), with `fields` set on top.
    A bad value raises ValueError (the CLI reports it as a usage error)."""
    return dataclass_from_args(EnvConfig, args, prefix=ENV_DEST_PREFIX).replace(**fields)


def add_set_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def split_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """`["lr=3e-4", "top-p=0.9"]` -> `{"lr": "3e-4", "top_p": "0.9"}` (values stay text: the field types them)."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        options[key] = raw
    return options
