"""Benchmark any agent against ETPO and the baselines: agents × tasks × seeds under one env-step budget.

    etpo bench --agents etpo,ppo,sft,prompting,my_pkg.my_module:MyAgent --tasks bundled --seeds 3 --budget 64
    etpo demo

Every (agent, task, seed) cell gets a fresh environment wrapped in `EnvStepBudget`, which counts env steps and refuses
to step past the budget, so every agent spends exactly the same number of sandboxed program runs. Learners train
within the budget (`learn(env, budget)`); plain agents act for `budget` steps. The best-on-dev program seen during
those steps (or the last successful one, `select="final"`) is then scored once on the task's held-out test part
through `tasks.evaluate(..., part="test")`. One sandbox serves every cell.

Each finished cell is written to `<out>/runs/<agent>__<task>__seed<k>.json` the moment it ends; a rerun with the
same folder skips those cells, so an interrupted benchmark resumes where it stopped. The aggregate files
(results.json, results.csv, summary.md, *.png) are rewritten from all cell files at the end of every run.

Module-level imports stay light so `etpo --version` is fast; heavy imports live inside the functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym  # already loaded by `etpo_env` itself (it registers the env)

# A failed run (no program ever succeeded on dev, or the chosen program failed on test) counts as a constant
# predictor: ROC AUC 0.5. Means then reflect both quality and reliability; the success rate is reported beside them.
CHANCE_SCORE = 0.5

SUITES = ("bundled", "paper", "all")
PLOT_COLUMNS = 4  # learning-curve panels per row

# A plain, sound sklearn pipeline: the "scripted" agent submits it every step. A fixed point of reference on any task
# (numeric or categorical columns, missing values, pandas or numpy input) that any learner should come close to.
SCRIPTED_PROGRAM = '''\
def build_model(X, y):
    import pandas as pd
    from sklearn.compose import make_column_selector, make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    numeric = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    categorical = make_pipeline(FunctionTransformer(lambda frame: frame.astype(str)),
                                OneHotEncoder(handle_unknown="ignore"))
    features = make_column_transformer(
        (numeric, make_column_selector(dtype_include="number")),
        (categorical, make_column_selector(dtype_exclude="number")),
    )
    model = make_pipeline(FunctionTransformer(pd.DataFrame), features, LogisticRegression(max_iter=1000))
    return model.fit(X, y)
'''


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """One benchmark: every agent runs on every task for every seed, each with `budget` env steps."""

    agents: list[str]  # registry names (etpo, ppo, sft, prompting, scripted, random) or "pkg.module:Class"
    tasks: list[str]  # task names (suites already expanded)
    seeds: list[int]  # one run per seed; seeds the env, numpy, random and torch
    budget: int  # env steps per (agent, task, seed); every agent gets exactly this many
    model: str = "tiny"  # "tiny" (built offline and cached) or a path / Hugging Face name for LM agents
    sandbox: str = "auto"  # sandbox backend shared by all runs: auto | docker | local | unsafe-process
    out: str = "results"  # output folder (also the resume state)
    max_attempts: int = 5  # env steps per episode
    mode: str = "fix"  # env mode: "fix" (stop at first success) or "refine" (keep improving)
    reward: str = "metric"  # env reward: metric | normalized | improvement
    prompt_style: str = "paper"  # dataset description style in prompts: paper | rich
    max_rows: int = 2000  # rows per task (subsampled deterministically by the task loader)
    input_format: str = "pandas"  # what X is inside build_model: "pandas" (real dtypes) or "numpy" (as the paper)
    select: str = "best"  # program scored on test: "best" on dev during the run, or "final" (last successful)
    agent_options: dict[str, Any] = field(default_factory=dict)  # extra constructor kwargs for agents (--set k=v)

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget must be at least 1 env step, got {self.budget}")
        if not self.agents or not self.tasks or not self.seeds:
            raise ValueError("need at least one agent, one task and one seed")
        if self.select not in ("best", "final"):
            raise ValueError(f"select must be 'best' or 'final', got {self.select!r}")
        for name in self.agents:
            if "__" in agent_label(name):
                raise ValueError(f"agent name {name!r} may not contain '__' (used in run file names)")

    def comparable_fields(self) -> dict[str, Any]:
        """Settings that must match for cells from an earlier run to be comparable with new ones."""
        keep = ("budget", "model", "max_attempts", "mode", "reward", "prompt_style", "max_rows", "input_format",
                "select", "agent_options")
        return {key: getattr(self, key) for key in keep}


def agent_label(spec: str) -> str:
    """Short, file-name-safe label: `my_pkg.my_module:MyAgent` -> `MyAgent`; registry names stay as they are."""
    label = spec.rsplit(":", 1)[-1] if ":" in spec else spec
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_file_name(agent: str, task: str, seed: int) -> str:
    return f"{agent_label(agent)}__{task}__seed{seed}.json"


# ----------------------------------------------------------------------------------------------------------------
# The budget: a counting wrapper every agent must go through
# ----------------------------------------------------------------------------------------------------------------


class BudgetExceeded(RuntimeError):
    """An agent asked for an env step beyond its budget."""


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


class EnvStepBudget(gym.Wrapper):
    """Counts env steps and refuses any step past `budget` (raises `BudgetExceeded`).

    The step that spends the last unit of budget returns `truncated=True`, so a learner sees a clean episode end
    (a time limit, bootstrapped like any truncation). It also keeps the learning curve (reward per step) and the
    programs to score on test: the best on dev and the last successful one.
    """

    def __init__(self, env: gym.Env, budget: int, on_step: Callable[[], None] | None = None):
        super().__init__(env)
        self.budget = int(budget)
        self.on_step = on_step
        self.steps = 0
        self.episodes = 0
        self.rewards: list[float] = []
        self.dev_scores: list[float | None] = []
        self.statuses: list[str] = []
        self.best_program: str | None = None
        self.best_dev_score = -math.inf
        self.final_program: str | None = None
        self.final_dev_score: float | None = None

    @property
    def remaining(self) -> int:
        return self.budget - self.steps

    @property
    def exhausted(self) -> bool:
        return self.steps >= self.budget

    def reset(self, **kwargs):
        self.episodes += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        if self.exhausted:
            raise BudgetExceeded(f"env-step budget of {self.budget} is spent; no further steps are allowed")
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self._record(float(reward), info)
        if self.on_step is not None:
            self.on_step()
        if self.exhausted and not terminated:
            truncated = True
        return obs, reward, terminated, truncated, info

    def _record(self, reward: float, info: dict) -> None:
        status = _status_name(info.get("status", ""))
        score = info.get("score")
        score = None if score is None or not math.isfinite(float(score)) else float(score)
        self.rewards.append(reward)
        self.dev_scores.append(score)
        self.statuses.append(status)
        program = info.get("program")
        if status == "ok" and score is not None and program:
            self.final_program, self.final_dev_score = program, score
            if score > self.best_dev_score:
                self.best_program, self.best_dev_score = program, score


# ----------------------------------------------------------------------------------------------------------------
# Agents
# ----------------------------------------------------------------------------------------------------------------

BUILTIN_AGENTS = ("scripted", "random")


def _call_with_accepted(factory: Callable, candidates: dict[str, Any]):
    """Call `factory` with those of `candidates` its signature accepts (all of them if it takes **kwargs)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return factory(**candidates)
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return factory(**{key: value for key, value in candidates.items() if key in names})


def make_agent(spec: str, *, seed: int, model: Callable[[], str], options: dict[str, Any] | None = None):
    """Build one agent. Constructors receive those of `seed`, `model` (a path) and `options` they accept.

    `model` is a thunk so the tiny model is only built when some agent actually asks for one.
    """
    from agents.base import RandomProgramAgent, ScriptedAgent

    if spec == "scripted":
        return ScriptedAgent(SCRIPTED_PROGRAM)
    if spec == "random":
        return RandomProgramAgent(seed=seed)
    from agents import resolve_agent_class

    factory = resolve_agent_class(spec)
    candidates: dict[str, Any] = {"seed": seed, **(options or {})}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    wants_model = any(name in parameters for name in ("model", "model_name_or_path", "model_path")) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    if wants_model:
        path = model()
        for name in ("model", "model_name_or_path", "model_path"):
            if name in parameters:
                candidates.setdefault(name, path)
        if not any(name in parameters for name in ("model", "model_name_or_path", "model_path")):
            candidates.setdefault("model", path)
    return _call_with_accepted(factory, candidates)


def is_learner(agent: Any) -> bool:
    return callable(getattr(agent, "learn", None))


def seed_everything(seed: int, torch_too: bool = True) -> None:
    """Seed Python, numpy and (for agents that may use it) torch before the agent is built: LoRA init is random."""
    random.seed(seed)
    import numpy as np

    np.random.seed(seed % 2**32)
    if torch_too or "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# One cell: (agent, task, seed)
# ----------------------------------------------------------------------------------------------------------------


def act_for_budget(agent: Any, env, seed: int) -> None:
    """Drive a plain agent (reset/act) until the budget wrapper says the budget is spent."""
    obs, info = env.reset(seed=seed)
    agent.reset()
    while not env.exhausted:
        action = agent.act(obs, info)
        obs, _reward, terminated, truncated, info = env.step(action)
        if (terminated or truncated) and not env.exhausted:
            obs, info = env.reset()
            agent.reset()


def run_cell(config: BenchConfig, agent_spec: str, task, seed: int, sandbox, model: Callable[[], str],
             on_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train/act within the budget, then score the chosen program once on the held-out test part."""
    import gymnasium as gym

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    import tasks as tasks_pkg

    seed_everything(seed, torch_too=agent_spec not in BUILTIN_AGENTS)
    record: dict[str, Any] = {"agent": agent_label(agent_spec), "agent_spec": agent_spec, "task": task.name,
                              "seed": seed, "budget": config.budget, "error": None}
    started = time.perf_counter()
    env = gym.make("DataSciCode-v0", task=task, sandbox=sandbox, max_attempts=config.max_attempts,
                   mode=config.mode, reward=config.reward, prompt_style=config.prompt_style)
    env = EnvStepBudget(env, config.budget, on_step=on_step)
    learner = False
    try:
        agent = make_agent(agent_spec, seed=seed, model=model, options=config.agent_options)
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
        record.update(test_status=_status_name(evaluation.status), test_score=evaluation.score,
                      test_message=evaluation.result.message if evaluation.score is None else "")
    record["success"] = record["test_score"] is not None
    counted = record["test_score"] if record["success"] else CHANCE_SCORE
    record["score"] = float(counted)
    normalized = task.normalize(counted, part="test")  # None when the task has no stored reference scores
    record["normalized"] = None if normalized is None else float(normalized)
    record["test_time_s"] = time.perf_counter() - test_started
    record["wall_time_s"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------------------------------------------
# Statistics and tables (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided `confidence` interval of the mean, Student t with n-1 dof.

    One value has no spread estimate: the half-width is NaN (printed as "n/a"), never a made-up zero.
    """
    from scipy import stats

    values = [float(v) for v in values if not math.isnan(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * math.sqrt(variance / n)
    return mean, half


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(half):
        return f"{mean:.{digits}f} ± n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(runs: Iterable[dict[str, Any]], agents: Sequence[str], tasks: Sequence[str]) -> dict[str, list[dict]]:
    """Rows per (task, agent) and overall per agent. Overall: per seed, the mean over tasks; then CI over seeds."""
    runs = list(runs)
    per_task = []
    for task in tasks:
        for agent in agents:
            cell = [r for r in runs if r["task"] == task and r["agent"] == agent]
            if cell:
                per_task.append(_summary_row(cell, task=task, agent=agent))
    overall = []
    for agent in agents:
        mine = [r for r in runs if r["agent"] == agent and r["task"] in tasks]
        seeds = sorted({r["seed"] for r in mine})
        # A seed enters the overall mean only when it has every task, so each overall value averages the same tasks.
        complete = [s for s in seeds if {r["task"] for r in mine if r["seed"] == s} >= set(tasks)]
        if not complete:
            continue
        by_seed = {s: [r for r in mine if r["seed"] == s] for s in complete}
        score = mean_ci([_mean([r["score"] for r in rs]) for rs in by_seed.values()])
        normalized = mean_ci([_mean(_known([r["normalized"] for r in rs])) for rs in by_seed.values()])
        used = [r for rs in by_seed.values() for r in rs]
        overall.append({
            "task": "overall", "agent": agent, "n": len(complete),
            "score": score[0], "score_ci": score[1], "normalized": normalized[0], "normalized_ci": normalized[1],
            "success_rate": _mean([float(r["success"]) for r in used]),
            "env_steps": _mean([sum(r["env_steps"] for r in rs) for rs in by_seed.values()]),
            "wall_time_s": _mean([sum(r["wall_time_s"] for r in rs) for rs in by_seed.values()]),
        })
    return {"per_task": per_task, "overall": overall}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _known(values: Iterable[float | None]) -> list[float]:
    """Normalized scores exist only for tasks with stored reference scores; the others are left out."""
    return [v for v in values if v is not None and not math.isnan(v)]


def _summary_row(cell: list[dict], *, task: str, agent: str) -> dict[str, Any]:
    score = mean_ci([r["score"] for r in cell])
    normalized = mean_ci(_known(r["normalized"] for r in cell))
    return {
        "task": task, "agent": agent, "n": len(cell),
        "score": score[0], "score_ci": score[1], "normalized": normalized[0], "normalized_ci": normalized[1],
        "success_rate": _mean([float(r["success"]) for r in cell]),
        "env_steps": _mean([r["env_steps"] for r in cell]),
        "wall_time_s": _mean([r["wall_time_s"] for r in cell]),
    }


TABLE_HEADER = ["task", "agent", "n", "test ROC AUC", "normalized", "success", "env steps", "wall s"]


def table_rows(summary: dict[str, list[dict]]) -> list[list[str]]:
    rows = []
    for row in [*summary["per_task"], *summary["overall"]]:
        rows.append([
            row["task"], row["agent"], str(row["n"]),
            format_ci(row["score"], row["score_ci"]), format_ci(row["normalized"], row["normalized_ci"]),
            f"{row['success_rate']:.0%}", f"{row['env_steps']:.0f}", f"{row['wall_time_s']:.1f}",
        ])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    # Written by hand: pandas' to_markdown needs the extra `tabulate` package for a few lines of output.
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Output folder
# ----------------------------------------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "machine": platform.machine(), "cpu_count": os.cpu_count()}
    for name in ("etpo-gym", "torch", "transformers", "peft", "gymnasium", "numpy", "pandas", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    try:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        found["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                             text=True, timeout=5).stdout.strip() or None
    except Exception:
        found["git_commit"] = None
    return found


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default))
    os.replace(tmp, path)  # a crash mid-write never leaves a half file that resume would trust


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


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
    current = json.loads(json.dumps(config.comparable_fields(), default=_json_default))
    differing = {key for key in current if key in previous and previous[key] != current[key]}
    if differing:
        details = ", ".join(f"{k}: {previous[k]!r} -> {current[k]!r}" for k in sorted(differing))
        raise ValueError(f"{out} holds results from different settings ({details}); use another --out folder")


CSV_COLUMNS = ["agent", "agent_spec", "task", "seed", "budget", "env_steps", "episodes", "learner", "dev_successes",
               "dev_score", "test_status", "test_score", "success", "score", "normalized", "train_time_s", "test_time_s", "wall_time_s", "error"]


def write_outputs(out: Path, config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """results.json, results.csv, summary.md and the plots, from every cell file in the folder."""
    import pandas as pd

    labels = list(dict.fromkeys([agent_label(a) for a in config.agents] + [r["agent"] for r in runs]))
    task_names = list(dict.fromkeys(list(config.tasks) + [r["task"] for r in runs]))
    runs = sorted(runs, key=lambda r: (task_names.index(r["task"]), labels.index(r["agent"]), r["seed"]))
    summary = summarize(runs, labels, task_names)
    _write_json_atomic(out / "results.json", {"config": dataclasses.asdict(config), "versions": versions(),
                                              "chance_score": CHANCE_SCORE, "summary": summary, "runs": runs})
    pd.DataFrame([{c: r.get(c) for c in CSV_COLUMNS} for r in runs], columns=CSV_COLUMNS).to_csv(
        out / "results.csv", index=False)
    plots = write_plots(out, runs, labels, task_names)
    (out / "summary.md").write_text(summary_markdown(config, summary, plots))
    return summary


def summary_markdown(config: BenchConfig, summary: dict[str, list[dict]], plots: Sequence[str]) -> str:
    lines = [
        "# Benchmark summary",
        "",
        f"Agents: {', '.join(config.agents)}. Tasks: {', '.join(config.tasks)}. Seeds: {config.seeds}.",
        f"Budget: {config.budget} env steps per (agent, task, seed); episodes of at most {config.max_attempts} "
        f"steps, mode `{config.mode}`, reward `{config.reward}`, prompts `{config.prompt_style}`, model "
        f"`{config.model}`, sandbox `{config.sandbox}`. Program scored on test: `{config.select}`"
        f"{' on dev' if config.select == 'best' else ' successful'}.",
        "",
        "Test ROC AUC on the held-out test part; normalized = (score − baseline) / (reference − baseline). "
        f"Values are mean ± half-width of the 95% t-interval over seeds (n/a with one seed). A run whose program "
        f"failed counts as a constant predictor (AUC {CHANCE_SCORE}); `success` is the share of runs with a test "
        "score. `overall`: per seed the mean over tasks, then mean ± CI over seeds. Env steps and wall time: "
        "mean per run (overall: per seed, summed over tasks).",
        "",
        markdown_table(TABLE_HEADER, table_rows(summary)),
        "",
    ]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, runs: list[dict], agents: Sequence[str], task_names: Sequence[str]) -> list[str]:
    """learning_curves.png (reward vs env steps, mean over seeds) and normalized_scores.png (bars with 95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not runs:
        return []
    written = []
    tasks_with_runs = [t for t in task_names if any(r["task"] == t for r in runs)]
    columns = min(PLOT_COLUMNS, len(tasks_with_runs))
    rows_of_panels = math.ceil(len(tasks_with_runs) / columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(5 * columns, 3.6 * rows_of_panels), squeeze=False)
    for ax in axes.flat[len(tasks_with_runs):]:
        ax.set_visible(False)  # the grid's unused panels
    for ax, task in zip(axes.flat, tasks_with_runs):
        for agent in agents:
            curves = [r["rewards"] for r in runs if r["task"] == task and r["agent"] == agent and r["rewards"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            stacked = np.array([c[:length] for c in curves], dtype=float)
            window = max(1, length // 10)  # moving average: single steps are too noisy to read
            smooth = np.array([np.convolve(c, np.ones(window) / window, mode="valid") for c in stacked])
            steps = np.arange(window, length + 1)
            mean = smooth.mean(axis=0)
            (line,) = ax.plot(steps, mean, label=f"{agent} (n={len(curves)})")
            if len(curves) > 1:  # band: ± one standard error of the mean over seeds
                sem = smooth.std(axis=0, ddof=1) / np.sqrt(len(curves))
                ax.fill_between(steps, mean - sem, mean + sem, color=line.get_color(), alpha=0.2)
        ax.set_title(task)
        ax.set_xlabel("env steps")
        ax.set_ylabel("reward (mean ± s.e. over seeds)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)
    written.append(str(out / "learning_curves.png"))

    summary = summarize(runs, agents, task_names)
    groups = [*tasks_with_runs, *(["overall"] if summary["overall"] else [])]
    rows = {(row["task"], row["agent"]): row for row in [*summary["per_task"], *summary["overall"]]}
    fig, ax = plt.subplots(figsize=(min(18.0, max(5.0, 0.35 * len(groups) * max(1, len(agents)))), 4.2))
    width = 0.8 / max(1, len(agents))
    for i, agent in enumerate(agents):
        xs, heights, errors = [], [], []
        for g, group in enumerate(groups):
            row = rows.get((group, agent))
            if row is not None and not math.isnan(row["normalized"]):
                xs.append(g + (i - (len(agents) - 1) / 2) * width)
                heights.append(row["normalized"])
                errors.append(0.0 if math.isnan(row["normalized_ci"]) else row["normalized_ci"])
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=agent)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("normalized test score")
    ax.set_title("test score: 0 = baseline, 1 = reference (95% CI)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "normalized_scores.png", dpi=110)
    plt.close(fig)
    written.append(str(out / "normalized_scores.png"))
    return written


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------


def resolve_tasks(items: Sequence[str]) -> list[str]:
    """Suite names (bundled, paper, all) expand to their tasks; anything else is a task name."""
    import tasks as tasks_pkg

    resolved: list[str] = []
    for item in items:
        resolved += tasks_pkg.names(suite=item) if item in SUITES else [item]
    return list(dict.fromkeys(resolved))


def run_benchmark(agents: Sequence[str], tasks: Sequence[str], seeds: int | Sequence[int], budget: int,
                  model: str = "tiny", sandbox: Any = "auto", out: str | os.PathLike = "results",
                  progress: bool = True, console=None, **options: Any) -> dict[str, Any]:
    """Run every agent on every task for every seed with `budget` env steps each; write the results folder.

    `seeds` is a count (seeds 0..N-1) or explicit seeds. `sandbox` is a backend name or a Sandbox instance (not
    closed here). `options` are further `BenchConfig` fields. Returns {"summary", "runs", "out"}.
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    backend = sandbox if isinstance(sandbox, str) else getattr(sandbox, "isolation", type(sandbox).__name__)
    config = BenchConfig(agents=list(agents), tasks=resolve_tasks(tasks), seeds=seed_list, budget=int(budget),
                         model=str(model), sandbox=backend, out=str(out), **options)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    check_resumable(out, config)
    _write_json_atomic(out / "config.json", {"config": dataclasses.asdict(config),
                                             "comparable": config.comparable_fields()})

    done = {(r["agent"], r["task"], r["seed"]) for r in load_runs(out) if not r.get("error")}
    cells = [(a, t, s) for t in config.tasks for a in config.agents for s in config.seeds
             if (agent_label(a), t, s) not in done]
    console = console or _console()
    if len(cells) < len(config.agents) * len(config.tasks) * len(config.seeds):
        console.print(f"resuming in {out}: {len(config.agents) * len(config.tasks) * len(config.seeds) - len(cells)}"
                      f" finished run(s) kept, {len(cells)} to go")

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


def _run_cells(config, cells, sandbox, model_path, out, progress, console) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    import tasks as tasks_pkg

    loaded: dict[str, Any] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("env steps"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        total = bar.add_task("benchmark", total=len(cells) * config.budget)
        for agent, task_name, seed in cells:
            if task_name not in loaded:
                loaded[task_name] = tasks_pkg.get(task_name, max_rows=config.max_rows,
                                                  input_format=config.input_format)
            bar.update(total, description=f"{agent_label(agent)} · {task_name} · seed {seed}")
            before = bar.tasks[0].completed
            record = run_cell(config, agent, loaded[task_name], seed, sandbox, model_path,
                              on_step=lambda: bar.advance(total))
            bar.update(total, completed=before + config.budget)  # an agent that stopped early still moves the bar
            _write_json_atomic(out / "runs" / run_file_name(agent, task_name, seed), record)
            if record["error"]:
                console.print(f"[red]{agent_label(agent)} on {task_name} (seed {seed}) failed:[/] {record['error']}")


def _model_thunk(model: str) -> Callable[[], str]:
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


def _console():
    from rich.console import Console

    return Console()


def print_table(summary: dict[str, list[dict]], console=None) -> None:
    from rich import box
    from rich.table import Table

    console = console or _console()
    table = Table(title="test score (mean ± 95% CI over seeds)", box=box.SIMPLE_HEAD)
    for name in TABLE_HEADER:
        table.add_column(name, justify="left" if name in ("task", "agent") else "right")
    rows = table_rows(summary)
    n_task_rows = len(summary["per_task"])
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=(i == n_task_rows - 1))
    if not console.is_terminal and console.width < 120:  # a log file has no width limit: keep rows unwrapped
        from rich.console import Console

        console = Console(file=console.file, width=120)
    console.print(table)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

# zero-shot is the prompting baseline the tiny model can answer (few-shot prompts are new to it: docs/results.md).
DEMO_AGENTS = ["etpo", "ppo", "sft", "zero-shot"]
DEMO_TASKS = ["breast_cancer", "titanic"]  # two bundled tasks; replaced by the first two bundled ones if absent


def _parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="'tiny' (built offline, cached) or a model path")
    parser.add_argument("--sandbox", default="auto", choices=["auto", "docker", "local", "unsafe-process"],
                        help="sandbox backend shared by every run")
    parser.add_argument("--max-attempts", type=int, default=5, help="env steps per episode")
    parser.add_argument("--mode", default="fix", choices=["fix", "refine"])
    parser.add_argument("--reward", default="metric", choices=["metric", "normalized", "improvement"])
    parser.add_argument("--prompt-style", default="paper", choices=["paper", "rich"])
    parser.add_argument("--max-rows", type=int, default=2000, help="row cap per task")
    parser.add_argument("--input-format", default="pandas", choices=["pandas", "numpy"],
                        help="what X is inside build_model")
    parser.add_argument("--select", default="best", choices=["best", "final"],
                        help="program scored on test: best on dev during the run, or the last successful one")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                        help="extra constructor argument for the agents (JSON value), repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmark agents × tasks × seeds under one env-step budget",
                                  description=__doc__.split("\n\n")[0])
    bench.add_argument("--agents", required=True,
                       help="comma list: etpo, ppo, sft, prompting, scripted, random, or pkg.module:Class")
    bench.add_argument("--tasks", default="bundled", help="comma list of task names or suites (bundled, paper, all)")
    bench.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    bench.add_argument("--budget", type=int, required=True, help="env steps per (agent, task, seed)")
    bench.add_argument("--out", default="results", help="output folder; rerunning with it resumes")
    _add_common(bench)
    bench.set_defaults(func=_bench_command)

    demo = subparsers.add_parser("demo", help="build the tiny model if needed and run ETPO vs the baselines briefly")
    demo.add_argument("--agents", default=",".join(DEMO_AGENTS))
    demo.add_argument("--tasks", default=None, help="default: two bundled tasks")
    demo.add_argument("--seeds", type=int, default=2)
    demo.add_argument("--budget", type=int, default=10)
    demo.add_argument("--out", default="results/demo")
    _add_common(demo)
    # One attempt per episode: the tiny model learned first prompts only, so feedback prompts (error + failing code)
    # are outside its training data. A capable model (--model PATH) can take --max-attempts 5, the paper's setting.
    demo.set_defaults(func=_demo_command, max_attempts=1)


def _options_from_args(args) -> dict[str, Any]:
    return {"max_attempts": args.max_attempts, "mode": args.mode, "reward": args.reward,
            "prompt_style": args.prompt_style, "max_rows": args.max_rows, "input_format": args.input_format,
            "select": args.select,
            "agent_options": _parse_set(args.options)}


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _run_and_report(args, agents: list[str], task_items: list[str]) -> int:
    console = _console()
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `my_pkg.my_module:MyAgent` in the working directory, like `python -m`
    result = run_benchmark(agents, task_items, args.seeds, args.budget, model=args.model, sandbox=args.sandbox,
                           out=args.out, progress=not args.no_progress, console=console, **_options_from_args(args))
    print_table(result["summary"], console)
    out = Path(result["out"])
    console.print(f"results: {out / 'summary.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    console.print(f"plots:   {out / 'learning_curves.png'}, {out / 'normalized_scores.png'}")
    return 1 if any(r.get("error") for r in result["runs"]) else 0


def _bench_command(args) -> int:
    try:
        return _run_and_report(args, _split(args.agents), _split(args.tasks))
    except KeyboardInterrupt:
        return 130


def _demo_command(args) -> int:
    import tasks as tasks_pkg
    from agents.tiny import ensure_tiny_model

    console = _console()
    if args.model == "tiny":
        console.print("tiny model: ensuring it is built (first time: about 5 minutes on 2 cores) ...")
        console.print(f"tiny model: {ensure_tiny_model()}")
    if args.tasks:
        task_items = _split(args.tasks)
    else:
        bundled = tasks_pkg.names(suite="bundled")
        task_items = [t for t in DEMO_TASKS if t in bundled] or bundled[:2]
        if len(task_items) < 2:
            task_items += [t for t in bundled if t not in task_items][: 2 - len(task_items)]
    return _run_and_report(args, _split(args.agents), task_items)
