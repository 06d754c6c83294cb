"""`etpo bench` and `etpo demo`.

    etpo bench --agents etpo,ppo,sft,zero-shot,my_pkg.my_module:MyAgent --tasks bundled --seeds 3 --budget 64 \
        --eval-every 16 --eval-episodes 5
    etpo demo

`--set key=value` sets a learner-config field of every agent whose config has it (the others are unaffected); a key
that no agent's config has, or a value its field cannot take, is a usage error naming the valid keys. The env options
are `EnvConfig`'s fields. Module-level imports stay light so `etpo --version` is fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

from agents.options import add_env_arguments, add_set_argument, env_config_from_args, split_pairs

# ETPO, one learned baseline and zero-shot prompting (the baseline the tiny model can answer; few-shot prompts are new
# to it: docs/results.md), what fits ten minutes on two cores; `--agents` adds PPO and GRPO (README: their cost).
DEMO_AGENTS = ["etpo", "sft", "zero-shot"]
# One bundled task (replaced by the first bundled one if absent): titanic, where the tiny model leaves the most room
# (mean normalized score 0.17 of its five-attempt episodes, README).
DEMO_TASKS = ["titanic"]
# The demo's schedule, set by what ten minutes on two cores hold (README "make demo"): ETPO's update is most of it,
# so 176 env steps (11 updates of the learners' default 16 steps), evaluated at the start, after 88 steps and at the
# end on 32 episodes each (with 24, a seed's step-0 estimate moved by 0.12). ETPO's gain excluded 0 there (README).
DEMO_SEEDS = 3
DEMO_BUDGET = 176
DEMO_EVAL_EVERY = 88
DEMO_EVAL_EPISODES = 32
# The metrics the demo's last line can report a gain on (--metric): run key of the gain, and its name in the line.
DEMO_METRICS = {"test_score": "gain", "validity": "validity_gain", "return": "return_gain"}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (built offline, cached) or a model path")
    parser.add_argument("--eval-every", type=int, default=None, metavar="STEPS",
                        help="training env steps between evaluations of the policy (default: a quarter of the "
                             "budget); it is also evaluated at step 0 and at the full budget")
    parser.add_argument("--eval-episodes", type=int, default=5, metavar="K",
                        help="fresh evaluation episodes per evaluation point (not counted in the budget)")
    add_set_argument(parser, "set a learner-config field for every agent whose config has it (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_env_arguments(parser)


def _add_ray(parser: Any) -> None:
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run the cells on a Ray cluster (no ADDRESS: 'auto', the cluster this host belongs to, "
                             "else a local runtime with one cell per CPU)")


def register(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmark agents × tasks × seeds under one env-step budget",
                                  description="Benchmark any agent against ETPO and the baselines: agents × tasks "
                                              "× seeds under one env-step training budget, the policy evaluated "
                                              "on fresh episodes at fixed points and scored on held-out test data.")
    bench.add_argument("--agents", required=True,
                       help="comma list: etpo, ppo, grpo, sft, prompting, zero-shot, few-shot, scripted, random, or pkg.module:Class")
    bench.add_argument("--tasks", default="bundled", help="comma list of task names or suites (bundled, paper, hard, all)")
    bench.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    bench.add_argument("--budget", type=int, required=True, help="training env steps per (agent, task, seed)")
    bench.add_argument("--out", default="results", help="output folder; rerunning with it resumes")
    _add_ray(bench)
    _add_common(bench)
    bench.set_defaults(func=_bench_command, prepare=_prepare, command_parser=bench)

    demo = subparsers.add_parser("demo", help="build the tiny model if needed and run ETPO vs the baselines briefly",
                                 description="A short benchmark of ETPO, SFT and zero-shot prompting (--agents: any "
                                             "others) under the benchmark protocol; prints each learner's final "
                                             "minus step-0 evaluation with its 95% CI, paired over seeds.")
    demo.add_argument("--agents", default=",".join(DEMO_AGENTS))
    demo.add_argument("--tasks", default=None, help=f"default: {', '.join(DEMO_TASKS)}")
    demo.add_argument("--seeds", type=int, default=DEMO_SEEDS)
    demo.add_argument("--budget", type=int, default=DEMO_BUDGET)
    demo.add_argument("--out", default="results/demo")
    where = demo.add_mutually_exclusive_group()
    _add_ray(where)
    where.add_argument("--in-process", action="store_true",
                      help="run the cells one after another in this process (the default with a model other than "
                           "tiny, which fills its device, or where Ray is not installed or there is one CPU)")
    demo.add_argument("--metric", default="test_score", choices=list(DEMO_METRICS),
                      help="the metric of the last line's gains: test_score (the primary: the final program's "
                           "normalized test score), validity (first-attempt validity) or return (episode return)")
    _add_common(demo)
    demo.set_defaults(eval_every=DEMO_EVAL_EVERY, eval_episodes=DEMO_EVAL_EPISODES)
    # Five attempts per episode in fix mode (EnvConfig's defaults), the paper's setting: the tiny model is trained on
    # the env's fix prompts too.
    demo.set_defaults(func=_demo_command, prepare=_prepare, command_parser=demo)


def _prepare(args: argparse.Namespace) -> None:
    """Parse-time checks (a ValueError is a usage error): the env options and `--set` against the agents."""
    from agents.registry import check_options

    _import_from_working_directory()
    args.env_config = env_config_from_args(args)
    args.agent_list = _split(args.agents)
    args.agent_options = split_pairs(args.overrides)
    check_options(args.agent_list, args.agent_options)


def _import_from_working_directory() -> None:
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `my_pkg.my_module:MyAgent` in the working directory, like `python -m`


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_and_report(args: argparse.Namespace, task_items: list[str], console: Any) -> tuple[int, dict[str, Any]]:
    from agents.benchmark.report import PLOTS, print_table
    from agents.benchmark.run import run_benchmark

    result = run_benchmark(args.agent_list, task_items, args.seeds, args.budget, model=args.model,
                           sandbox=args.env_config.sandbox, out=args.out, progress=not args.no_progress,
                           console=console, env=args.env_config, eval_every=args.eval_every,
                           eval_episodes=args.eval_episodes, agent_options=args.agent_options,
                           ray=getattr(args, "ray", None))
    print_table(result["summary"], console)
    out = Path(result["out"])
    console.print(f"results in {out}:", soft_wrap=True)  # a path is never broken across lines
    console.print("  summary.md, results.csv, results.json")
    console.print("  " + ", ".join(name for name in PLOTS if (out / name).exists()))
    failed = any(r.get("error") for r in result["runs"])
    return (1 if failed else 0), result


def _bench_command(args: argparse.Namespace) -> int:
    from agents.benchmark.report import make_console
    from agents.benchmark.run import IncomparableResults

    try:
        return _run_and_report(args, _split(args.tasks), make_console())[0]
    except IncomparableResults as exc:  # the user's folder choice, not a crash: the message, no traceback
        args.command_parser.error(str(exc))
    except KeyboardInterrupt:
        return 130


def _demo_command(args: argparse.Namespace) -> int:
    import tasks as tasks_pkg
    from agents.benchmark.report import make_console
    from agents.benchmark.run import IncomparableResults
    from agents.tiny import ensure_tiny_model

    args.ray = demo_cells_address(args.ray, args.in_process, args.model)
    console = make_console()
    if args.model == "tiny":
        console.print("tiny model: ensuring it is built (first time: about 5 minutes on 2 cores) ...")
        console.print(f"tiny model: {ensure_tiny_model()}")
    if args.ray is not None:
        console.print("cells: side by side on Ray, one per CPU (--in-process: one at a time)")
    if args.tasks:
        task_items = _split(args.tasks)
    else:
        bundled = tasks_pkg.names(suite="bundled")
        task_items = [t for t in DEMO_TASKS if t in bundled]
        task_items += [t for t in bundled if t not in task_items][: len(DEMO_TASKS) - len(task_items)]
    try:
        try:
            code, result = _run_and_report(args, task_items, console)
        except IncomparableResults as exc:  # an earlier demo under other defaults (an upgrade): kept, not mixed
            aside = _set_aside(Path(args.out))
            console.print(f"{exc.out} held {exc.reason}: moved to {aside}; running afresh", soft_wrap=True)
            code, result = _run_and_report(args, task_items, console)
    except KeyboardInterrupt:
        return 130
    print_gains(result, console)
    console.print(demo_line(result, args.metric), soft_wrap=True)
    return code


def demo_cells_address(ray: str | None, in_process: bool, model: str) -> str | None:
    """Where the demo's cells run: a Ray address (`run_benchmark`'s `ray`), or None for one after another here.

    The tiny model's cells run side by side on Ray ("auto": this host's cluster, else a local runtime with one cell
    per CPU): a cell then is a process on one torch thread, and two such cells get more from two cores than one
    cell on both (the demo took 8.2 minutes instead of 9.1 on two cores: README "make demo"). A hub model's cells
    run here, one after another: each fills its device, and Ray hides a GPU from a cell that did not ask for one.
    """
    if ray is not None:
        return ray
    if in_process or model != "tiny" or (os.cpu_count() or 1) < 2 or importlib.util.find_spec("ray") is None:
        return None
    return "auto"


def _set_aside(folder: Path) -> Path:
    """Rename `folder` to the first free `<folder>.<n>` (n = 1, 2, ...) and return the new path; nothing is deleted."""
    n = 1
    while (aside := folder.with_name(f"{folder.name}.{n}")).exists():
        n += 1
    return folder.rename(aside)


def demo_line(result: dict[str, Any], metric: str) -> str:
    """The demo's last line, for scripts: every agent's gain (final − step 0, paired by seed, 95% t-interval) on
    `metric`: `demo: etpo gain test_score +0.12 [0.03, 0.21]; ppo gain test_score ...`."""
    key = DEMO_METRICS[metric]
    parts = []
    for row in result["summary"]["overall"]:
        mean, half = row.get(key), row.get(f"{key}_ci")
        if mean is None or math.isnan(mean):
            parts.append(f"{row['agent']} gain {metric} n/a")
            continue
        interval = ("[n/a, n/a]" if half is None or math.isnan(half)  # one seed: no interval
                    else f"[{mean - half:.2f}, {mean + half:.2f}]")
        parts.append(f"{row['agent']} gain {metric} {mean:+.2f} {interval}")
    return "demo: " + "; ".join(parts)


def print_gains(result: dict[str, Any], console: Any) -> None:
    """What each learner gained by training: final minus step-0 evaluation, paired over seeds, with its 95% CI."""
    from agents.benchmark.statistics import SCALE_LABELS, format_ci

    learners = {r["agent"] for r in result["runs"] if r.get("learner")}
    rows = [row for row in result["summary"]["overall"] if row["agent"] in learners]
    if not rows:
        return
    console.print(f"final − step 0 per learner, {SCALE_LABELS[result['summary']['scale']]}:")
    console.print(f"(mean ± 95% CI, paired over {rows[0]['n']} seeds)")
    for row in rows:
        console.print(f"  {row['agent']:<12} {format_ci(row['gain'], row['gain_ci']):>14}")
