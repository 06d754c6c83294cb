"""`etpo model build-tiny`, `etpo train` and `etpo serve`.

`etpo train --agent NAME ...` gets one option per field of that learner's config dataclass (shown by
`etpo train --agent NAME --help`), plus `--set key=value` for any field. Module-level imports stay light so
`etpo --version` is fast; everything heavy is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any


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
    from rich.console import Console

    from agents.tiny import ensure_tiny_model, evaluate_samples, summary_line

    console = Console()
    path = ensure_tiny_model(args.out, preset=args.preset, seed=args.seed, rebuild=args.rebuild,
                             log=lambda msg: console.print(f"[dim]{msg}[/dim]"), sandbox=args.sandbox)
    build = json.loads((path / "build.json").read_text())
    console.print(f"tiny model: {path}  ({build['n_params'] / 1e6:.2f}M parameters, "
                  f"loss {build['first_loss']:.2f} -> {build['final_loss']:.2f}, built in {build['build_seconds']}s)")
    if args.no_eval:
        return 0
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    rows = evaluate_samples(path, names, n_samples=args.samples, seed=args.seed, sandbox=args.sandbox)
    _print_sample_table(console, rows)
    (path / "samples_eval.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(summary_line(rows), flush=True)  # the last line, plain text
    return 0


def _print_sample_table(console: Any, rows: list[dict]) -> None:
    from rich.table import Table

    from agents.tiny import summary

    table = Table(title="tiny model: five-attempt fix-mode episodes (paper-style prompt, temperature 1)")
    for column in ("task", "first-attempt validity", "fix rate", "episode success", "distinct",
                   "mean norm. (success)", "mean norm. (all)"):
        table.add_column(column, justify="right" if column != "task" else "left")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

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
def learner_config_class(cls: type) -> type | None:
    """The config dataclass of a learner: its `config_class` attribute or the annotation of `__init__(config=...)`."""
    explicit = getattr(cls, "config_class", None)
    if explicit is not None:
        return explicit
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: the learner simply gets no per-field options
        return None
    tp = hints.get("config")
    for candidate in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


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
        from agents import LEARNERS
        from agents.config import add_dataclass_arguments

        if agent not in LEARNERS and ":" not in agent:
            return  # the handler reports the unknown agent
        try:
            from agents import resolve_agent_class

            config_cls = learner_config_class(resolve_agent_class(agent))
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
        description="Train a learner (etpo, ppo, sft, prompting or pkg.module:Class) in DataSciCode-v0 for a budget "
                    "of env steps. `etpo train --agent NAME --help` lists that learner's options.")
    train.__class__ = _TrainParser  # subparsers build plain ArgumentParsers; this one adds learner options
    train.add_argument("--agent", required=True, help="etpo, ppo, sft, prompting, or pkg.module:Class")
    train.add_argument("--task", default="breast_cancer", help="task name (see `etpo tasks list`)")
    train.add_argument("--model", default="tiny", help="'tiny' (built if missing), a local path or a hub name")
    train.add_argument("--budget", type=int, required=True, help="env steps (sandboxed programs) to spend")
    train.add_argument("--out", required=True, help="run directory: logs, TensorBoard, checkpoints, summary")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="set a learner config field (repeatable)")
    env = train.add_argument_group("environment")
    env.add_argument("--sandbox", default="auto", help="auto, docker, local or unsafe-process")
    env.add_argument("--max-attempts", type=int, default=5, help="attempts per episode")
    env.add_argument("--mode", default="fix", choices=["fix", "refine"], help="episode mode")
    env.add_argument("--reward", default="metric", choices=["metric", "normalized", "improvement"])
    env.add_argument("--prompt-style", default="paper", choices=["paper", "rich"])
    env.add_argument("--num-envs", type=int, default=1, help="vectorised envs (gymnasium sync vector env)")
    train.set_defaults(func=_train_command, config_class=None)


def build_learner_config(config_cls: type | None, args: argparse.Namespace) -> Any:
    from agents.config import apply_overrides, dataclass_from_args

    if config_cls is None:
        if args.overrides:
            raise ValueError("this learner declares no config dataclass, so --set cannot apply")
        return None
    return apply_overrides(dataclass_from_args(config_cls, args, prefix="cfg_"), args.overrides)


def _train_command(args: argparse.Namespace) -> int:
    import gymnasium as gym

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from agents import resolve_agent_class

    cls = resolve_agent_class(args.agent)
    config_cls = args.config_class or learner_config_class(cls)
    config = build_learner_config(config_cls, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    if args.resume and checkpoint.exists():
        agent = cls.load(checkpoint)
        print(f"resumed from {checkpoint}", file=sys.stderr)
    else:
        agent = _construct(cls, model=args.model, config=config)
    env_kwargs = {"task": args.task, "sandbox": args.sandbox, "max_attempts": args.max_attempts,
                  "mode": args.mode, "reward": args.reward, "prompt_style": args.prompt_style}
    if args.num_envs > 1:
        env = gym.make_vec("DataSciCode-v0", num_envs=args.num_envs, vectorization_mode="sync", **env_kwargs)
    else:
        env = gym.make("DataSciCode-v0", **env_kwargs)
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


def _construct(cls: type, model: str, config: Any) -> Any:
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "model" in params:
        kwargs["model"] = model
    if config is not None:
        kwargs["config"] = config
    return cls(**kwargs)


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
    serve.set_defaults(func=_serve_command)


def _serve_command(args: argparse.Namespace) -> int:
    from agents.serve import serve_forever

    serve_forever(args.model, host=args.host, port=args.port, name=args.name, device=args.device)
    return 0
