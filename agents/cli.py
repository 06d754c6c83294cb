"""The `etpo` console script: `etpo sandbox`, `tasks`, `model build-tiny`, `train`, `serve`, `bench`, `demo`.

Each package contributes its subcommands through a module with `register(subparsers)`; the parser is built here so
`etpo --help` lists them all. `etpo train --agent NAME ...` gets one option per field of that learner's config
dataclass (shown by `etpo train --agent NAME --help`), one per `EnvConfig` field, and `--set key=value` for any
learner field. A subcommand may set a `prepare(args)` default: it runs right after parsing, and a ValueError from it
is a usage error (exit status 2). Module-level imports stay light so `etpo --version` is fast; the handlers import
what they need. Also runs as `python -m agents.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym  # loaded by etpo_env anyway (it registers the env)

from agents.config import add_dataclass_arguments, dataclass_from_args
from agents.options import add_env_arguments, add_set_argument, env_config_from_args
from agents.registry import (
    AGENTS,
    build_agent,
    config_class_for,
    is_learner,
    make_config,
    resolve_agent_class,
)
from etpo_env import __version__  # importing etpo_env registers DataSciCode-v0

# Modules providing `register(subparsers)`, in `etpo --help` order; a module that is missing is skipped.
SUBCOMMAND_MODULES = [
    "sandbox.cli",
    "tasks.cli",
    "agents.cli",
    "agents.benchmark.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etpo",
        description="etpo-gym: LM agents write data-science code; a sandbox scores it; ETPO and baselines learn.",
    )
    parser.add_argument("--version", action="version", version=f"etpo-gym {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        if module_name == "agents.cli":
            register(subparsers)  # this module (also when it runs as __main__)
            continue
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
    prepare = getattr(args, "prepare", None)
    if prepare is not None:
        try:
            prepare(args)
        except ValueError as exc:
            args.command_parser.error(str(exc))  # exits with status 2, after the subcommand's usage line
    return int(args.func(args) or 0)


def register(subparsers: Any) -> None:
    _register_model(subparsers)
    _register_train(subparsers)
    _register_serve(subparsers)


# ----------------------------------------------------------------------------------------------------------------
# etpo model build-tiny
# ----------------------------------------------------------------------------------------------------------------
def _register_model(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="build and inspect local models (the tiny offline code model)")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION")
    build = model_sub.add_parser("build-tiny", help="train the tiny code model offline (BPE tokenizer + small LM)",
                                 description="Train a BPE tokenizer and a small causal LM on task prompts and "
                                             "demonstration programs, save it to the cache, and report the validity, "
                                             "diversity and normalized score of its samples per task.")
    build.add_argument("--preset", default="default", choices=["default", "test"], help="model size and recipe")
    build.add_argument("--seed", type=int, default=0, help="seed (the build is deterministic for a seed)")
    build.add_argument("--out", default=None, help="directory (default: $ETPO_CACHE/tiny/<preset>-seed<seed>)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even if a matching model is cached")
    build.add_argument("--no-eval", action="store_true", help="skip the sample evaluation")
    build.add_argument("--tasks", default=None, help="comma list of tasks to evaluate on (default: all bundled)")
    build.add_argument("--samples", type=int, default=8, help="episodes per task for the evaluation")
    build.add_argument("--sandbox", default="auto", help="sandbox backend for the feedback runs and the evaluation")
    build.set_defaults(func=_build_tiny_command)
    model.set_defaults(func=lambda args: (model.print_help(), 0)[1])


def _build_tiny_command(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from agents.tiny import ensure_tiny_model
    from agents.tiny_evaluation import evaluate_samples, summary_line

    console = Console()

    def say(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    path = ensure_tiny_model(args.out, preset=args.preset, seed=args.seed, rebuild=args.rebuild, log=say,
                             sandbox=args.sandbox)
    build = json.loads((path / "build.json").read_text())
    console.print(f"tiny model: {path}  ({build['n_params'] / 1e6:.2f}M parameters, "
                  f"loss {build['first_loss']:.2f} -> {build['final_loss']:.2f}, built in {build['build_seconds']}s)")
    if args.no_eval:
        return 0
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    started = time.perf_counter()
    rows = evaluate_samples(path, names, n_samples=args.samples, seed=args.seed, sandbox=args.sandbox, log=say)
    say(f"evaluated in {time.perf_counter() - started:.0f}s")
    _print_sample_table(console, rows)
    (path / "samples_eval.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(summary_line(rows), flush=True)  # the last line, plain text
    return 0


def _print_sample_table(console: Any, rows: list[dict]) -> None:
    from rich import box
    from rich.table import Table

    from agents.tiny_evaluation import summary

    # short headers, explained in the caption, so the table fits 80 columns without cropping a name or a number
    table = Table(title="tiny model: five-attempt fix-mode episodes (paper prompt, temperature 1)", box=box.SIMPLE,
                  caption="valid: first attempts that run; fix: attempts after a failure that run; success: episodes "
                          "with a program that runs; norm: mean normalized score of successful episodes (ok) or of "
                          "all, a failure counting 0")
    for column in ("task", "valid", "fix", "success", "distinct", "norm ok", "norm all"):
        table.add_column(column, justify="right" if column != "task" else "left", no_wrap=True)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for r in rows:
        table.add_row(r["task"], fmt(r["validity"]), fmt(r.get("fix_rate")), fmt(r.get("episode_success")),
                      fmt(r["distinct"]), fmt(r["mean_normalized_valid"]), fmt(r["mean_normalized_all"]))
    if rows:
        mean = summary(rows)
        table.add_row("[bold]mean[/bold]", fmt(mean["validity"]), fmt(mean["fix_rate"]),
                      fmt(mean["episode_success"]), fmt(mean["distinct"]), "", fmt(mean["mean_normalized_all"]))
    console.print(table)


# ----------------------------------------------------------------------------------------------------------------
# etpo train
# ----------------------------------------------------------------------------------------------------------------
class _TrainParser(argparse.ArgumentParser):
    """Adds the chosen learner's config fields as options before parsing (the learner is named by --agent)."""

    _learner_added: str | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        agent = _peek_option(args, "--agent")
        if agent and self._learner_added is None:
            self._add_learner_options(agent)
        return super().parse_known_args(args, namespace)

    def _add_learner_options(self, agent: str) -> None:
        if agent not in AGENTS and ":" not in agent:
            return  # `prepare` reports the unknown agent
        try:
            config_cls = config_class_for(agent)
        except (ImportError, ValueError):
            return
        self._learner_added = agent
        if config_cls is not None:
            group = self.add_argument_group(f"{agent} learner options ({config_cls.__name__})")
            taken = {opt for action in self._actions for opt in action.option_strings}
            skip = {f.name for f in dataclasses.fields(config_cls) if "--" + f.name.replace("_", "-") in taken}
            add_dataclass_arguments(group, config_cls, dest_prefix="cfg_", skip=skip)
            self.set_defaults(config_class=config_cls)


def _peek_option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _register_train(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train", help="train one learner on one task",
        description="Train a learner (etpo, ppo, grpo, sft, prompting or pkg.module:Class) in DataSciCode-v0 for a budget "
                    "of env steps. `etpo train --agent NAME --help` lists that learner's options.")
    train.__class__ = _TrainParser  # subparsers build plain ArgumentParsers; this one adds learner options
    train.add_argument("--agent", required=True, help="etpo, ppo, grpo, sft, prompting, or pkg.module:Class")
    train.add_argument("--task", default="breast_cancer", help="task name (see `etpo tasks list`)")
    train.add_argument("--model", default="tiny", help="'tiny' (built if missing), a local path or a hub name")
    train.add_argument("--budget", type=int, required=True, help="env steps (sandboxed programs) to spend")
    train.add_argument("--out", required=True, help="run directory: logs, TensorBoard, checkpoints, summary")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    add_set_argument(train, "set a learner config field (repeatable); an unknown key is a usage error")
    train.add_argument("--num-envs", type=int, default=None,
                       help="envs collected from at once (default: the learner config's num_envs, 16 for etpo and "
                            "ppo, 8 for sft, which spawn them from the one env; a learner without that field gets "
                            "a gymnasium sync vector env of this many)")
    add_env_arguments(train)
    train.set_defaults(func=_train_command, prepare=_prepare_train, command_parser=train, config_class=None)


def build_learner_config(config_cls: type | None, args: argparse.Namespace) -> Any:
    """The learner's config from its options and `--set` (a ValueError names the valid keys)."""
    if config_cls is None:
        if args.overrides:
            raise ValueError("this learner declares no config dataclass, so --set cannot apply")
        return None
    return make_config(config_cls, overrides=args.overrides, base=dataclass_from_args(config_cls, args, prefix="cfg_"))


def _prepare_train(args: argparse.Namespace) -> None:
    args.agent_class = resolve_agent_class(args.agent)
    if not is_learner(args.agent_class):
        raise ValueError(f"agent {args.agent!r} does not learn (it has no learn method); benchmark it with etpo bench")
    args.config_class = args.config_class or config_class_for(args.agent_class)
    args.config = build_learner_config(args.config_class, args)
    if args.num_envs is not None and args.num_envs < 1:
        raise ValueError(f"--num-envs must be at least 1, got {args.num_envs}")
    args.spawns_envs = args.config is not None and "num_envs" in {f.name for f in dataclasses.fields(args.config)}
    if args.spawns_envs and args.num_envs is not None:
        args.config = dataclasses.replace(args.config, num_envs=args.num_envs)
    args.env_config = env_config_from_args(args, task=args.task)


def _train_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    if args.resume and checkpoint.exists():
        agent = args.agent_class.load(checkpoint, **({"num_envs": args.num_envs} if args.spawns_envs and
                                                    args.num_envs is not None else {}))
        print(f"resumed from {checkpoint}", file=sys.stderr)
    else:
        agent = build_agent(args.agent_class, model=args.model, config=args.config)
    if not args.spawns_envs and (args.num_envs or 1) > 1:  # the learner cannot batch one env itself
        env = gym.make_vec("DataSciCode-v0", num_envs=args.num_envs, vectorization_mode="sync",
                           config=args.env_config)
    else:
        env = gym.make("DataSciCode-v0", config=args.env_config)
    try:
        learn = agent.learn
        if "out_dir" in inspect.signature(learn).parameters:
            summary = learn(env, args.budget, out_dir=out)
        else:
            summary = learn(env, args.budget)
            agent.save(checkpoint)
    finally:
        env.close()
    summary = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float, str, bool))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# etpo serve
# ----------------------------------------------------------------------------------------------------------------
def _register_serve(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a local model over the OpenAI-compatible HTTP API (loopback by default)",
        description="Serve a local causal LM (or a saved policy with adapters) on /v1/completions, "
                    "/v1/chat/completions and /v1/models.")
    serve.add_argument("--model", required=True, help="'tiny', a model directory, or a saved LMPolicy directory")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    serve.add_argument("--name", default=None, help="model name reported by /v1/models")
    serve.add_argument("--device", default="auto", help="cpu, cuda or auto")
    serve.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    serve.set_defaults(func=_serve_command)


def _serve_command(args: argparse.Namespace) -> int:
    from agents.serve import serve_forever

    serve_forever(args.model, host=args.host, port=args.port, name=args.name, device=args.device,
                  dtype=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
