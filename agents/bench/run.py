"""Running a benchmark: every (agent, task, seed) cell trains or acts within one env-step budget, then its chosen
program is scored once on the task's held-out test part; finished cells are kept for resume.

Every cell gets a fresh environment wrapped in `EnvStepBudget`, which counts env steps and refuses to step past the
budget, so every agent spends exactly the same number of sandboxed program runs. Learners train within the budget
(`learn(env, budget)`); plain agents act for `budget` steps (`agents.base.play`). The best-on-dev program seen during
those steps (or the last successful one, `select="final"`) is then scored through `tasks.evaluate(..., part="test")`.
One sandbox serves every cell.

Each finished cell is written to `<out>/runs/<agent>__<task>__seed<k>.json` the moment it ends; a rerun with the same
folder skips those cells, so an interrupted benchmark resumes where it stopped. The aggregate files (results.json,
results.csv, summary.md, *.png) are rewritten from all cell files at the end of every run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym

import etpo_env  # noqa: F401  (registers DataSciCode-v0)
import tasks as tasks_pkg
from agents.base import play
from agents.bench.config import BenchConfig, agent_label, run_file_name, split_options
from agents.bench.report import json_default, make_console, write_json_atomic, write_outputs
from agents.bench.statistics import CHANCE_SCORE
from agents.registry import build_agent, check_options, is_learner, options_for
from etpo_env.config import EnvConfig
from etpo_env.info import status_name
from etpo_env.wrappers import BudgetExceeded, EnvStepBudget

MODEL_FREE_AGENTS = ("scripted", "random")  # built-in agents that need neither a model nor torch


def seed_everything(seed: int, torch_too: bool = True) -> None:
    """Seed Python, numpy and (for agents that may use it) torch before the agent is built: LoRA init is random."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too or "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def act_for_budget(agent: Any, env: EnvStepBudget, seed: int) -> None:
    """Drive a plain agent (reset/act) until the budget wrapper says the budget is spent."""
    play(env, agent, seed=seed, stop=lambda: env.exhausted)


def run_cell(config: BenchConfig, agent_spec: str, task: Any, seed: int, sandbox: Any, model: Callable[[], str],
             on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train/act within the budget, then score the chosen program once on the held-out test part."""
    seed_everything(seed, torch_too=agent_spec not in MODEL_FREE_AGENTS)
    record: dict[str, Any] = {"agent": agent_label(agent_spec), "agent_spec": agent_spec, "task": task.name,
                              "seed": seed, "budget": config.budget, "error": None}
    started = time.perf_counter()
    env = gym.make("DataSciCode-v0", config=config.env.replace(task=task, sandbox=sandbox))
    env = EnvStepBudget(env, config.budget, on_step=on_step)
    learner = False
    try:
        agent = build_agent(agent_spec, seed=seed, model=model, overrides=options_for(agent_spec, config.agent_options))
        learner = is_learner(agent)
        if learner:
            try:
                agent.learn(env, config.budget)
            except BudgetExceeded:
                record["budget_note"] = "learner asked for steps past its budget; training stopped there"
        else:
            act_for_budget(agent, env, seed)
    except BudgetExceeded as exc:  # a plain agent cannot trigger this; kept for agents that step on their own
        record["budget_note"] = str(exc)
    except Exception as exc:  # an agent that crashes is a failed cell with its traceback, not a crashed benchmark
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=20)
    finally:
        env.close()
    train_time = time.perf_counter() - started

    program = env.best_program if config.select == "best" else env.final_program
    dev_score = env.best_dev_score if config.select == "best" else env.final_dev_score
    record.update({
        "learner": learner,
        "env_steps": env.steps,
        "episodes": env.episodes,
        "dev_successes": sum(status == "ok" for status in env.statuses),
        "dev_score": dev_score if program is not None else None,
        "program": program,
        "rewards": env.rewards,
        "dev_scores": env.dev_scores,
        "statuses": env.statuses,
        "train_time_s": train_time,
    })
    test_started = time.perf_counter()
    if program is None:
        record.update(test_status="no_program", test_score=None, test_message="no program succeeded on dev")
    else:
        evaluation = tasks_pkg.evaluate(task, program, sandbox, part="test", seed=seed)
        record.update(test_status=status_name(evaluation.status), test_score=evaluation.score,
                      test_message=evaluation.result.message if evaluation.score is None else "")
    record["success"] = record["test_score"] is not None
    counted = record["test_score"] if record["success"] else CHANCE_SCORE
    record["score"] = float(counted)
    normalized = task.normalize(counted, part="test")  # None when the task has no stored reference scores
    record["normalized"] = None if normalized is None else float(normalized)
    record["test_time_s"] = time.perf_counter() - test_started
    record["wall_time_s"] = time.perf_counter() - started
    return record


def run_cell_isolated(config: BenchConfig, agent_spec: str, task_name: str, seed: int) -> dict[str, Any]:
    """One cell in a process of its own (a Ray worker): its own task, sandbox (`config.sandbox`) and model path.

    Runs the cell exactly as the local loop does and returns the cell record (plain data, picklable).
    """
    from sandbox import make_sandbox

    task = load_task(config, task_name)
    sandbox = make_sandbox(config.sandbox)
    try:
        return run_cell(config, agent_spec, task, seed, sandbox, _model_thunk(config.model))
    finally:
        sandbox.close()


def load_task(config: BenchConfig, task_name: str) -> Any:
    return tasks_pkg.get(task_name, max_rows=config.env.max_rows, input_format=config.env.input_format)


# ----------------------------------------------------------------------------------------------------------------
# Resume store: one file per finished cell
# ----------------------------------------------------------------------------------------------------------------
def load_runs(out: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a file that cannot be read is treated as not done; its cell runs again
    return runs


def check_resumable(out: Path, config: BenchConfig) -> None:
    """Refuse to mix cells run under different settings (budget, model, env options) in one folder."""
    path = out / "config.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text()).get("comparable", {})
    current = json.loads(json.dumps(config.comparable_fields(), default=json_default))
    differing = {key for key in current if key in previous and previous[key] != current[key]}
    if differing:
        details = ", ".join(f"{k}: {previous[k]!r} -> {current[k]!r}" for k in sorted(differing))
        raise ValueError(f"{out} holds results from different settings ({details}); use another --out folder")


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def resolve_tasks(items: Sequence[str]) -> list[str]:
    """Suite names (bundled, paper, all) expand to their tasks; anything else is a task name."""
    resolved: list[str] = []
    for item in items:
        resolved += tasks_pkg.names(suite=item) if item in tasks_pkg.SUITES else [item]
    return list(dict.fromkeys(resolved))


def run_benchmark(agents: Sequence[str], tasks: Sequence[str], seeds: int | Sequence[int], budget: int,
                  model: str = "tiny", sandbox: Any = "auto", out: str | os.PathLike = "results",
                  progress: bool = True, console: Any = None, env: EnvConfig | None = None,
                  ray: str | None = None, **options: Any) -> dict[str, Any]:
    """Run every agent on every task for every seed with `budget` env steps each; write the results folder.

    `seeds` is a count (seeds 0..N-1) or explicit seeds. `sandbox` is a backend name or a Sandbox instance (not
    closed here). `env` is every cell's `EnvConfig` (its task and sandbox are the cell's); `options` are further
    `BenchConfig` fields (`select`, `agent_options`) or `EnvConfig` fields (`max_rows=300`, `mode="refine"`, ...),
    which override `env`. `ray` is a Ray address ("auto" for the local cluster): the cells then run as Ray tasks
    (`agents.bench.ray_exec`), each with its own sandbox of the configured backend. Returns {"summary", "runs",
    "out"}.
    """
    bench_options, env_options = split_options(options)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    backend = sandbox if isinstance(sandbox, str) else getattr(sandbox, "isolation", type(sandbox).__name__)
    env_config = (env or EnvConfig()).replace(**env_options)
    config = BenchConfig(agents=list(agents), tasks=resolve_tasks(tasks), seeds=seed_list, budget=int(budget),
                         model=str(model), sandbox=backend, out=str(out), env=env_config, **bench_options)
    check_options(config.agents, config.agent_options)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    check_resumable(out, config)
    write_json_atomic(out / "config.json", {"config": config.to_dict(), "comparable": config.comparable_fields()})

    done = {(r["agent"], r["task"], r["seed"]) for r in load_runs(out) if not r.get("error")}
    cells = [(a, t, s) for t in config.tasks for a in config.agents for s in config.seeds
             if (agent_label(a), t, s) not in done]
    console = console or make_console()
    if len(cells) < len(config.agents) * len(config.tasks) * len(config.seeds):
        console.print(f"resuming in {out}: {len(config.agents) * len(config.tasks) * len(config.seeds) - len(cells)}"
                      f" finished run(s) kept, {len(cells)} to go")

    if ray is not None:
        _run_cells_on_ray(ray, config, cells, out, progress, console)
        runs = load_runs(out)
        return {"summary": write_outputs(out, config, runs), "runs": runs, "out": str(out)}
    model_path = _model_thunk(config.model)
    owned = isinstance(sandbox, str)
    if owned and cells:
        from sandbox import make_sandbox

        sandbox = make_sandbox(sandbox)
    try:
        _run_cells(config, cells, sandbox, model_path, out, progress, console)
    except KeyboardInterrupt:
        write_outputs(out, config, load_runs(out))  # the finished runs are worth a table already
        console.print(f"interrupted: finished runs are kept in {out}; the same command resumes from there")
        raise
    finally:
        if owned and not isinstance(sandbox, str):
            sandbox.close()
    runs = load_runs(out)
    summary = write_outputs(out, config, runs)
    return {"summary": summary, "runs": runs, "out": str(out)}


def _run_cells(config: BenchConfig, cells: list, sandbox: Any, model_path: Callable[[], str], out: Path,
               progress: bool, console: Any) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    loaded: dict[str, Any] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("env steps"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        total = bar.add_task("benchmark", total=len(cells) * config.budget)
        for agent, task_name, seed in cells:
            if task_name not in loaded:
                loaded[task_name] = load_task(config, task_name)
            bar.update(total, description=f"{agent_label(agent)} · {task_name} · seed {seed}")
            before = bar.tasks[0].completed
            record = run_cell(config, agent, loaded[task_name], seed, sandbox, model_path,
                              on_step=lambda: bar.advance(total))
            bar.update(total, completed=before + config.budget)  # an agent that stopped early still moves the bar
            write_json_atomic(out / "runs" / run_file_name(agent, task_name, seed), record)
            if record["error"]:
                console.print(f"[red]{agent_label(agent)} on {task_name} (seed {seed}) failed:[/] {record['error']}")


def _run_cells_on_ray(address: str, config: BenchConfig, cells: list, out: Path, progress: bool,
                      console: Any) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from agents.bench.ray_exec import run_cells

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        total = bar.add_task("benchmark on Ray", total=len(cells))

        def on_record(record: dict[str, Any]) -> None:
            write_json_atomic(out / "runs" / run_file_name(record["agent_spec"], record["task"], record["seed"]),
                              record)
            bar.advance(total)
            if record["error"]:
                console.print(f"[red]{record['agent']} on {record['task']} (seed {record['seed']}) failed:[/] "
                              f"{record['error']}")

        run_cells(address, config, cells, on_record)


def _model_thunk(model: str) -> Callable[[], str]:
    """A model path resolved on first use, so the tiny model is only built when some agent takes a model."""
    cache: dict[str, str] = {}

    def resolve() -> str:
        if "path" not in cache:
            if model == "tiny":
                from agents.tiny import ensure_tiny_model

                cache["path"] = str(ensure_tiny_model())
            else:
                cache["path"] = model
        return cache["path"]

    return resolve
