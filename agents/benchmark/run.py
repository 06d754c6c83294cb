"""Running a benchmark: every (agent, task, seed) cell trains within one env-step budget, and its policy is evaluated
on fresh episodes at fixed points; finished cells are kept for resume.

The protocol of one cell (`run_cell`), with budget B and evaluation interval E:

- Training: a learner is called as `agent.learn(env, b)` for the cumulative budgets b = E, 2E, ..., B on one
  training env (dev-part feedback) wrapped in `EnvStepBudget(B)`; the env, its budget wrapper and the learner persist
  across calls, so training is one run cut at the evaluation points. An agent without `learn` is not trained.
- Evaluation: at env step 0, after every `learn` call and at B, `eval_episodes` fresh episodes in the configured
  episode mode are played through `agent.reset()` / `agent.act(obs, info)` (or `act_batch(observations, infos)`
  where the agent has it) on separate envs that are never counted against the budget and never train the agent.
  Episode seeds depend only on (task, seed, episode index), the same at every point (common random numbers: a
  policy that did not change replays its evaluation exactly), and the Python, numpy and torch generators are
  seeded from them for the evaluation and restored afterwards, so every agent meets the same evaluation episodes
  and evaluating does not change what training samples. The final program of each episode (fix mode: the
  program that ran; refine mode: the episode's best on dev) is scored once on the task's held-out test part; an
  episode in which nothing ran scores the chance level (`CHANCE_SCORE`). An agent that cannot learn is evaluated
  once, at step 0, and that evaluation stands for every point (it cannot change); so is a prompting agent, whose
  `learn` only plays episodes with its fixed model.
- Search score (secondary): the best-on-dev program of the training steps (of the step-0 evaluation episodes for
  an agent that does not learn), scored on test, which is what best-of-N sampling would report.

Each finished cell is written to `<out>/runs/<agent>__<task>__seed<k>.json` the moment it ends; a rerun with the same
folder skips those cells, so an interrupted benchmark resumes where it stopped. The aggregate files (results.json,
results.csv, summary.md, *.png) are rewritten from all cell files at the end of every run. The record's fields are
documented in `agents.benchmark.report` (schema `SCHEMA`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym

import etpo_env  # noqa: F401  (registers DataSciCode-v0)
import tasks as tasks_pkg
from agents.benchmark.config import SCHEMA, BenchConfig, agent_label, run_file_name, split_options
from agents.benchmark.episodes import TestScorer, evaluate_point, learns, point_summary
from agents.benchmark.record import CellRecord
from agents.benchmark.report import json_default, make_console, write_json_atomic, write_outputs
from agents.benchmark.statistics import CHANCE_SCORE, run_metrics
from agents.registry import (
    AGENTS,
    build_agent,
    check_options,
    config_class_for,
    make_config,
    options_for,
    resolve_agent_class,
)
from etpo_env.config import EnvConfig
from etpo_env.wrappers import BudgetExceeded, EnvStepBudget

if TYPE_CHECKING:
    from sandbox.api import Sandbox
    from tasks.task import Task

MODEL_FREE_AGENTS = ("scripted", "random")  # built-in agents that need neither a model nor torch


def seed_everything(seed: int, torch_too: bool = True) -> None:
    """Seed Python, numpy and (for agents that may use it) torch before the agent is built: LoRA init is random."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too or "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------------------------
def run_cell(config: BenchConfig, agent_spec: str, task: Task, seed: int, sandbox: Sandbox, model: Callable[[], str],
             on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train in cumulative budget chunks, evaluate the policy at every point, score the search program on test.
    Returns the cell's record (`CellRecord.to_json`)."""
    seed_everything(seed, torch_too=agent_spec not in MODEL_FREE_AGENTS)
    record = _new_record(config, agent_spec, task.name, seed)
    started = time.perf_counter()
    env_config = config.env.replace(task=task, sandbox=sandbox)
    train_env = EnvStepBudget(gym.make("DataSciCode-v0", config=env_config), config.budget, on_step=on_step)
    eval_envs = [gym.make("DataSciCode-v0", config=env_config) for _ in range(config.eval_episodes)]
    scorer = TestScorer(task, sandbox, seed)
    try:
        with _quiet_model_loading(agent_spec):
            agent = build_agent(agent_spec, seed=seed, model=model,
                                overrides=options_for(agent_spec, config.agent_options))
        record.learner = learns(agent)
        _train_and_evaluate(agent, config, record, train_env, eval_envs, scorer, seed, on_step)
    except Exception as exc:  # an agent that crashes is a failed cell with its traceback, not a crashed benchmark
        record.error = f"{type(exc).__name__}: {exc}"
        record.traceback = traceback.format_exc(limit=20)
    finally:
        for env in [train_env, *eval_envs]:
            env.close()
    record.env_steps, record.episodes = train_env.steps, train_env.episodes
    record.rewards, record.dev_scores, record.statuses = train_env.rewards, train_env.dev_scores, train_env.statuses
    record.search_result = _search_result(record, train_env, scorer)
    record.metrics = run_metrics(record.to_json(), missing=_chance_point(task, config.env))
    record.wall_time_s = time.perf_counter() - started
    return record.to_json()


def _quiet_model_loading(agent_spec: str) -> contextlib.AbstractContextManager:
    """The benchmark's progress bar is the console's one: no "Loading weights" bar from transformers while a
    built-in LM agent loads its model (switched back on after, as it was)."""
    if agent_spec not in AGENTS or agent_spec in MODEL_FREE_AGENTS:
        return contextlib.nullcontext()
    from agents.tiny import no_library_progress_bars

    return no_library_progress_bars()


def agent_settings(agent_spec: str, seed: int, agent_options: dict[str, Any]) -> dict[str, Any] | None:
    """Every config field a cell's agent is built with (defaults included; JSON form), or None for an agent without
    a config. Stored in each run record, so a resumed benchmark can tell a finished cell made under other settings
    (e.g. a package version whose learner defaults differ) from one it can keep."""
    config_cls = config_class_for(agent_spec)
    if config_cls is None:
        return None
    built = make_config(config_cls, seed=seed, overrides=options_for(agent_spec, agent_options))
    return json.loads(json.dumps(dataclasses.asdict(built), default=json_default))


def _kept_runs(out: Path, config: BenchConfig) -> tuple[set[tuple[str, str, int]], int]:
    """The finished cells a resumed benchmark keeps — no error, and made with the agent settings it would use now
    (a record from before settings were recorded is kept) — and how many finished ones it runs again instead."""
    specs = {agent_label(a): a for a in config.agents}
    kept, stale = set(), 0
    for run in load_runs(out):
        if run.get("error"):
            continue
        spec = specs.get(run["agent"])
        if spec is not None and "agent_settings" in run:
            try:
                current = agent_settings(spec, int(run["seed"]), config.agent_options)
            except Exception:  # noqa: BLE001  (the agent cannot be configured now: its cell runs and reports it)
                current = None
            if current != run["agent_settings"]:
                stale += 1
                continue
        kept.add((run["agent"], run["task"], run["seed"]))
    return kept, stale


def unrun_cell_record(config: BenchConfig, agent_spec: str, task: Task, seed: int, error: str,
                      attempts: int | None = None) -> dict[str, Any]:
    """The record of a cell in which nothing ran (a cell lost on a cluster, after `attempts` runs): the cell's own
    agent, `error` saying why, no env steps, and every evaluation point at the chance level, as `run_cell` counts an
    agent that failed before its first step."""
    record = _new_record(config, agent_spec, task.name, seed)
    record.error, record.attempts = error, attempts
    record.search_result = {"dev_score": None, "program": None, **TestScorer(task, None, seed).score(None)}
    record.metrics = run_metrics(record.to_json(), missing=_chance_point(task, config.env))
    return record.to_json()


def _new_record(config: BenchConfig, agent_spec: str, task_name: str, seed: int) -> CellRecord:
    record = CellRecord(agent_spec, task_name, seed, config.budget, config.eval_every, config.eval_episodes)
    with contextlib.suppress(Exception):  # an agent that cannot be configured fails in its cell, with its traceback
        record.agent_settings = agent_settings(agent_spec, seed, config.agent_options)
    return record


def _train_and_evaluate(agent: Any, config: BenchConfig, record: CellRecord, train_env: EnvStepBudget,
                        eval_envs: list[Any], scorer: TestScorer, seed: int,
                        on_step: Callable[[], None] | None) -> None:
    for index, point in enumerate(config.eval_points):
        if point > 0:
            if not record.learner:
                break  # it cannot change: its step-0 evaluation stands for every point
            clock = time.perf_counter()
            try:
                record.learn_budgets.append(point)
                agent.learn(train_env, point)
            except BudgetExceeded as exc:  # evaluated once more as it is, then no further training
                record.budget_note = f"learner asked for steps past its budget; training stopped there ({exc})"
            finally:
                record.train_time_s += time.perf_counter() - clock
        clock = time.perf_counter()
        episodes = evaluate_point(agent, eval_envs, scorer, config, record.task, seed, index, on_step)
        record.eval_time_s += time.perf_counter() - clock
        record.evaluations.append(point_summary(point, train_env.steps, episodes))
        if record.budget_note is not None:
            break


def _search_result(record: CellRecord, train_env: EnvStepBudget, scorer: TestScorer) -> dict[str, Any]:
    """Best-on-dev program of the training steps (of the step-0 evaluation episodes for an agent without learn)."""
    if train_env.best_program is not None:
        program, dev_score = train_env.best_program, train_env.best_dev_score
    else:
        ran = [e for point in record.evaluations[:1] for e in point["episodes"] if e["dev_score"] is not None]
        best = max(ran, key=lambda e: e["dev_score"], default=None)
        program = None if best is None else best["program"]
        dev_score = None if best is None else best["dev_score"]
    return {"dev_score": dev_score, "program": program, **scorer.score(program)}


def _chance_point(task: Any, env: EnvConfig) -> dict[str, Any]:
    """What an evaluation point that was never reached (the agent crashed first) counts as: nothing ran, every
    attempt a failed step."""
    normalized = task.normalize(CHANCE_SCORE, part="test")
    return {"score": CHANCE_SCORE, "normalized": None if normalized is None else float(normalized),
            "success_rate": 0.0, "attempts_to_success": None, "first_attempt_validity": 0.0,
            "attempts_to_first_run": None, "episode_return": env.failure_reward * env.max_attempts}


def run_cell_isolated(config: BenchConfig, agent_spec: str, task_name: str, seed: int,
                      on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """One cell in a process of its own (a Ray worker): its own task, sandbox (`config.sandbox`) and model path.

    Runs the cell exactly as the local loop does (`on_step` after each env step, as there) and returns the cell
    record (plain data, picklable).
    """
    from sandbox import make_sandbox

    task = load_task(config, task_name)
    sandbox = make_sandbox(config.sandbox)
    try:
        return run_cell(config, agent_spec, task, seed, sandbox, _model_thunk(config.model), on_step=on_step)
    finally:
        sandbox.close()


def load_task(config: BenchConfig, task_name: str) -> Any:
    from tasks.splits import PROTOCOLS

    return tasks_pkg.get(task_name, max_rows=config.env.max_rows, input_format=config.env.input_format,
                         split=PROTOCOLS[config.env.split])


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


class IncomparableResults(ValueError):
    """The --out folder holds results a run with these settings must not mix with: another results schema, or
    cells run under other settings (`reason` says which)."""

    def __init__(self, out: Path, reason: str):
        self.out, self.reason = out, reason
        super().__init__(f"{out} holds {reason}; use another --out folder")


def check_resumable(out: Path, config: BenchConfig) -> None:
    """Refuse a folder of another results schema, or of cells run under different settings (budget, evaluation
    schedule, model, env options)."""
    _check_schema(out)
    path = out / "config.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text()).get("comparable", {})
    current = json.loads(json.dumps(config.comparable_fields(), default=json_default))
    differing = {key for key in current if key in previous and previous[key] != current[key]}
    if differing:
        details = ", ".join(f"{k}: {previous[k]!r} -> {current[k]!r}" for k in sorted(differing))
        raise IncomparableResults(out, f"results from different settings ({details})")


def _check_schema(out: Path) -> None:
    found = []
    if (out / "config.json").exists():
        found.append(("config.json", json.loads((out / "config.json").read_text()).get("schema")))
    for path in sorted((out / "runs").glob("*.json"))[:1] if (out / "runs").is_dir() else []:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            found.append((f"runs/{path.name}", json.loads(path.read_text()).get("schema")))
    for name, schema in found:
        if schema != SCHEMA:
            version = "no schema field (version 1)" if schema is None else f"schema {schema}"
            raise IncomparableResults(out, (
                f"results of another benchmark protocol ({name}: {version}; this version writes schema {SCHEMA}, "
                "which evaluates the policy at fixed points instead of scoring the best program found), "
                "not comparable"))


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def resolve_tasks(items: Sequence[str]) -> list[str]:
    """Suite names (bundled, paper, hard, all) expand to their tasks; anything else is a task name."""
    resolved: list[str] = []
    for item in items:
        resolved += tasks_pkg.names(suite=item) if item in tasks_pkg.SUITES else [item]
    return list(dict.fromkeys(resolved))


def run_benchmark(agents: Sequence[str], tasks: Sequence[str], seeds: int | Sequence[int], budget: int,
                  model: str = "tiny", sandbox: Any = "auto", out: str | os.PathLike = "results",
                  progress: bool = True, console: Any = None, env: EnvConfig | None = None,
                  ray: str | None = None, **options: Any) -> dict[str, Any]:
    """Run every agent on every task for every seed with `budget` training env steps each; write the results folder.

    `seeds` is a count (seeds 0..N-1) or explicit seeds. `sandbox` is a backend name or a Sandbox instance (not
    closed here). `env` is every cell's `EnvConfig` (its task and sandbox are the cell's); `options` are further
    `BenchConfig` fields (`eval_every`, `eval_episodes`, `agent_options`) or `EnvConfig` fields (`max_rows=300`,
    `mode="refine"`, ...), which override `env`. `ray` is a Ray address ("auto" for the local cluster): the cells
    then run as Ray tasks (`agents.benchmark.ray_exec`), each with its own sandbox of the configured backend. Returns
    {"summary", "runs", "out"}.
    """
    bench_options, env_options = split_options(options)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    backend = sandbox if isinstance(sandbox, str) else getattr(sandbox, "isolation", type(sandbox).__name__)
    env_config = (env or EnvConfig()).replace(**env_options)
    config = BenchConfig(agents=list(agents), tasks=resolve_tasks(tasks), seeds=seed_list, budget=int(budget),
                         model=str(model), sandbox=backend, out=str(out), env=env_config, **bench_options)
    check_options(config.agents, config.agent_options)
    out = Path(out)
    check_resumable(out, config)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {"schema": SCHEMA, "config": config.to_dict(),
                                            "comparable": config.comparable_fields()})

    done, stale = _kept_runs(out, config)
    cells = [(a, t, s) for t in config.tasks for a in config.agents for s in config.seeds
             if (agent_label(a), t, s) not in done]
    console = console or make_console()
    grid = len(config.agents) * len(config.tasks) * len(config.seeds)
    if len(cells) < grid:
        console.print(f"resuming in {out}: {grid - len(cells)} finished run(s) kept, {len(cells)} to go")
    if stale:
        console.print(f"{stale} finished run(s) in {out} were made with other agent settings (their learner's "
                      "defaults changed since): they run again")

    if ray is not None:
        _run_cells_on_ray(ray, config, cells, out, progress, console)
    else:
        _run_locally(config, cells, sandbox, out, progress, console)
    runs = load_runs(out)
    summary = write_outputs(out, config, runs)
    return {"summary": summary, "runs": runs, "out": str(out)}


def _run_locally(config: BenchConfig, cells: list, sandbox: Any, out: Path, progress: bool, console: Any) -> None:
    owned = isinstance(sandbox, str)
    if owned and cells:
        from sandbox import make_sandbox

        sandbox = make_sandbox(sandbox)
    try:
        _run_cells(config, cells, sandbox, _model_thunk(config.model), out, progress, console)
    except KeyboardInterrupt:
        write_outputs(out, config, load_runs(out))  # the finished runs are worth a table already
        console.print(f"interrupted: finished runs are kept in {out}; the same command resumes from there")
        raise
    finally:
        if owned and not isinstance(sandbox, str):
            sandbox.close()


def cell_work(config: BenchConfig, agent_spec: str) -> int:
    """Progress units of one cell: its training env steps plus the most env steps its evaluations can take."""
    per_point = config.eval_episodes * config.env.max_attempts
    if not _expects_learner(agent_spec):
        return per_point
    return config.budget + per_point * len(config.eval_points)


def _expects_learner(agent_spec: str) -> bool:
    try:
        factory = resolve_agent_class(agent_spec)
    except Exception:  # an agent that cannot be resolved fails in its cell; its work is a guess here
        return True
    prompting = getattr(sys.modules.get("agents.prompting"), "PromptingAgent", None)
    if prompting is not None and isinstance(factory, type) and issubclass(factory, prompting):
        return False
    return callable(getattr(factory, "learn", None))


def _progress(console: Any, progress: bool, unit: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not progress)


def _run_cells(config: BenchConfig, cells: list, sandbox: Any, model_path: Callable[[], str], out: Path,
               progress: bool, console: Any) -> None:
    loaded: dict[str, Any] = {}
    work = {spec: cell_work(config, spec) for spec in config.agents}
    with _progress(console, progress, "steps") as bar:
        total = bar.add_task("benchmark", total=sum(work[agent] for agent, _, _ in cells))
        for agent, task_name, seed in cells:
            if task_name not in loaded:
                loaded[task_name] = load_task(config, task_name)
            bar.update(total, description=f"{agent_label(agent)[:12]} {task_name[:14]} s{seed}")
            before = bar.tasks[0].completed
            record = run_cell(config, agent, loaded[task_name], seed, sandbox, model_path,
                              on_step=lambda: bar.advance(total))
            bar.update(total, completed=before + work[agent])  # short episodes leave part of the allowance unused
            write_json_atomic(out / "runs" / run_file_name(agent, task_name, seed), record)
            if record["error"]:
                console.print(f"[red]{agent_label(agent)} on {task_name} (seed {seed}) failed:[/] {record['error']}")


def _run_cells_on_ray(address: str, config: BenchConfig, cells: list, out: Path, progress: bool,
                      console: Any) -> None:
    from agents.benchmark.ray_exec import run_cells

    work = {spec: cell_work(config, spec) for spec in config.agents}
    counted: dict[tuple, int] = {}  # progress units shown per cell, at most its work (a retried cell counts once)
    with _progress(console, progress, "steps") as bar:
        total = bar.add_task("benchmark on Ray", total=sum(work[agent] for agent, _, _ in cells))

        def show(cell: tuple, units: int) -> None:
            units = min(units, work[cell[0]] - counted.get(cell, 0))
            counted[cell] = counted.get(cell, 0) + units
            bar.advance(total, units)

        def on_record(record: dict[str, Any]) -> None:
            write_json_atomic(out / "runs" / run_file_name(record["agent_spec"], record["task"], record["seed"]),
                              record)
            show((record["agent_spec"], record["task"], record["seed"]), work[record["agent_spec"]])
            if record["error"]:
                console.print(f"[red]{record['agent']} on {record['task']} (seed {record['seed']}) failed:[/] "
                              f"{record['error']}")

        run_cells(address, config, cells, on_record, on_steps=show)


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
