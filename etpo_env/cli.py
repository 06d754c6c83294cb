"""The `etpo` console script.

Each package contributes its subcommands through a module with ``register(subparsers)``; the parser is built
here so `etpo --help` lists them all. Imports are lazy so `etpo --version` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from etpo_env import __version__

# (subcommand, module providing `register(subparsers)`); a module that is missing is skipped.
SUBCOMMAND_MODULES = [
    "sandbox.cli",
    "tasks.cli",
    "agents.cli",
    "etpo_env.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etpo",
        description="etpo-gym: LM agents write data-science code; a sandbox scores it; ETPO and baselines learn.",
    )
    parser.add_argument("--version", action="version", version=f"etpo-gym {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise  # a real import error inside the module, not an absent subcommand module
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
