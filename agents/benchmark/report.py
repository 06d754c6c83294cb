"""Reports of a benchmark: the results folder (results.json, results.csv, summary.md, plots) and the console tables.

Results schema, version 3 (`agents.benchmark.config.SCHEMA`). Scores are normalized test scores (0 = the task's baseline
pipeline, 1 = its reference pipeline; None for a task without stored reference scores) unless named `*_score`,
which are the raw test metric (ROC AUC). The primary metric is the final program's normalized test score (what a
user of the agent gets); beside it, where learning shows first, `statistics.LEARNING_METRICS`: first-attempt
validity, episode return and attempts to the first program that ran (new in version 3).

- `config.json`: {"schema": 3, "config": BenchConfig.to_dict(), "comparable": the settings a resumed run must share}.
- `runs/<agent>__<task>__seed<k>.json`, one cell: `schema`, `agent` (label), `agent_spec`, `task`, `seed`, `budget`,
  `eval_every`, `eval_episodes`, `learner` (bool), `learn_budgets` (the cumulative budgets `learn` was called with),
  `error` (null, or the exception of a crashed agent, with `traceback`), `budget_note` (a learner that stepped past
  its budget); training: `env_steps`, `episodes`, `rewards`, `dev_scores`, `statuses` (one entry per training step);
  `evaluations`: one entry per measured point {`point` (training env steps scheduled), `env_steps` (steps actually
  taken by then), `score`, `normalized`, `success_rate`, `attempts_to_success`, `first_attempt_validity`,
  `attempts_to_first_run`, `episode_return`, `episodes`: [{`seed`, `attempts`, `success_attempt` (attempt whose
  program first ran, or null), `dev_score`, `return` (the env's reward summed over the episode), `program`,
  `test_status`, `test_score`, `test_message`, `score` (test score, or the chance level 0.5 when nothing ran or the
  program failed on test), `normalized`}]}; `curve`: every scheduled point {`point`, `measured`, and each key of
  `statistics.CURVE_KEYS`} (an agent that does not learn is measured at 0 only: its later points repeat it);
  `final`/`final_score` (the point at `budget`), `step0`/`step0_score`, `gain`/`gain_score` (final − step 0),
  `auc`/`auc_score` (mean over the points), `success_rate` and `attempts_to_success` (at `budget`),
  `search`/`search_score` (the best-on-dev program of training, of the step-0 evaluation episodes for an agent
  that does not learn, scored on test), detailed in `search_result` {`dev_score`, `program`, `test_status`,
  `test_score`, `score`, `normalized`}; per learning metric `<m>` of validity, return, attempts: `<m>_final`,
  `<m>_step0`, `<m>_gain`, `<m>_auc`;
  `train_time_s`, `eval_time_s`, `wall_time_s`.
- `results.json`: {"schema": 3, "config", "versions", "chance_score", "summary", "runs"}; `summary` has
  `per_task` and `overall` rows (for each metric of `statistics.PER_RUN`, plus `final_score` and `gain_score`: the
  mean and its 95% t-interval half-width `<metric>_ci` over seeds; `overall` averages the tasks per seed first),
  `aggregates` (each key of `statistics.AGGREGATED` -> agent -> {"iqm", "mean": [value, low, high], "n_runs",
  "n_tasks"}), `probability_of_improvement` (agent -> [P(etpo beats it on final), low, high]),
  `probability_of_improvement_by_metric` (the other aggregated keys, the same form), `task_shares` ("step 0" or
  agent -> [share of tasks where etpo's final is above it, low, high]), `aggregate_tasks`, and `by_group` (suite ->
  {"tasks", "final" and "gain" (agent -> {"iqm", "mean", ...}), "probability_of_improvement", "task_shares"}, the
  same comparison within each suite; empty unless the tasks span two suites).
- `results.csv`: one row per cell (`CSV_COLUMNS`); `summary.md`: the tables and plots; `learning_gains.png` (the
  primary score, validity and return at every point, and each agent's gain over its step 0, paired by seed), `eval_curves.png` (primary),
  `eval_curves_validity.png`, `eval_curves_return.png`, `final_scores.png`, `aggregates.png`,
  `performance_profiles.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from agents.benchmark.config import SCHEMA, BenchConfig, agent_label
from agents.benchmark.statistics import (
    CHANCE_SCORE,
    LEARNING_LABELS,
    LEARNING_METRICS,
    REFERENCE_AGENT,
    SCALE_LABELS,
    format_ci,
    mean_ci,
    performance_profile,
    score_matrices,
    summarize,
)

PLOT_COLUMNS = 4  # panels per row of the evaluation-curve figure
PLOTS = ("learning_gains.png", "eval_curves.png", "eval_curves_validity.png", "eval_curves_return.png",
         "final_scores.png", "aggregates.png", "performance_profiles.png")
LEARNING_CURVES = {"eval_curves_validity.png": "validity", "eval_curves_return.png": "return"}

TABLE_HEADER = ["task", "agent", "n", "final", "final − step 0", "AUC", "search", "success", "attempts",
                "test ROC AUC", "wall s"]
CONSOLE_HEADER = ["task", "agent", "final", "gain", "AUC", "search", "ok"]
LEARNING_HEADER = ["task", "agent", "n", "first-attempt validity", "validity gain", "episode return", "return gain",
                   "attempts to first run", "attempts gain"]
AGGREGATE_HEADER = ["agent", "IQM [95% CI]", "mean [95% CI]", f"P({REFERENCE_AGENT} > agent)"]
GROUP_HEADER = ["agent", "final IQM [95% CI]", "final mean [95% CI]", "gain mean [95% CI]",
                f"P({REFERENCE_AGENT} > agent)", f"share of tasks {REFERENCE_AGENT} above"]


def table_rows(summary: dict[str, Any], digits: int = 3) -> list[list[str]]:
    """Markdown rows: every metric with its 95% interval over seeds."""
    rows = []
    for row in [*summary["per_task"], *summary["overall"]]:
        rows.append([
            row["task"], row["agent"], str(row["n"]),
            *(format_ci(row[k], row[f"{k}_ci"], digits) for k in ("final", "gain", "auc", "search")),
            _percent(row["success_rate"]), _number(row["attempts_to_success"], 1),
            format_ci(row["final_score"], row["final_score_ci"], digits), f"{row['wall_time_s']:.1f}",
        ])
    return rows


def learning_rows(summary: dict[str, Any], digits: int = 2) -> list[list[str]]:
    """Markdown rows of the learning metrics: final and gain (final − step 0, paired by seed), 95% intervals."""
    return [[row["task"], row["agent"], str(row["n"]),
             *(format_ci(row[key], row[f"{key}_ci"], digits)
               for prefix in LEARNING_METRICS for key in (f"{prefix}_final", f"{prefix}_gain"))]
            for row in [*summary["per_task"], *summary["overall"]]]


def console_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The console's narrow rows (80 columns): final and gain with their intervals, AUC, search, success."""
    return [[row["task"][:13], row["agent"][:13], format_ci(row["final"], row["final_ci"], 2),
             format_ci(row["gain"], row["gain_ci"], 2), _number(row["auc"], 2), _number(row["search"], 2),
             _percent(row["success_rate"])]
            for row in [*summary["per_task"], *summary["overall"]]]


def aggregate_header(summary: dict[str, Any]) -> list[str]:
    """The aggregate table's columns; the probability of improvement only where the reference agent ran."""
    return AGGREGATE_HEADER if summary["probability_of_improvement"] else AGGREGATE_HEADER[:-1]


def aggregate_rows(summary: dict[str, Any], key: str = "final", digits: int = 2) -> list[list[str]]:
    improvement = (summary["probability_of_improvement"] if key == "final"
                   else summary.get("probability_of_improvement_by_metric", {}).get(key, {}))
    rows = []
    for agent, found in summary["aggregates"][key].items():
        row = [agent, _interval(found["iqm"], digits), _interval(found["mean"], digits)]
        if improvement:
            row.append(_interval(improvement[agent], digits) if agent in improvement else "—")
        rows.append(row)
    return rows


def _interval(estimate: Sequence[float], digits: int) -> str:
    value, low, high = estimate
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0%}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    # Written by hand: pandas' to_markdown needs the extra `tabulate` package for a few lines of output.
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "machine": platform.machine(), "cpu_count": os.cpu_count()}
    for name in ("etpo-gym", "torch", "transformers", "peft", "gymnasium", "numpy", "pandas", "scikit-learn",
                 "rliable"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    try:
        root = Path(__file__).resolve().parents[2]
        found["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                             text=True, timeout=5).stdout.strip() or None
    except Exception:
        found["git_commit"] = None
    return found


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=json_default))
    os.replace(tmp, path)  # a crash mid-write never leaves a half file that resume would trust


def json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


CSV_COLUMNS = ["agent", "agent_spec", "task", "seed", "budget", "eval_every", "eval_episodes", "learner", "env_steps",
               "final", "final_score", "step0", "step0_score", "gain", "auc", "auc_score", "success_rate",
               "attempts_to_success", "search", "search_score",
               *(f"{prefix}_{part}" for prefix in LEARNING_METRICS for part in ("final", "step0", "gain", "auc")),
               "train_time_s", "eval_time_s", "wall_time_s", "error"]


def write_outputs(out: Path, config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json, results.csv, summary.md and the plots, from every cell file in the folder."""
    import pandas as pd

    labels = list(dict.fromkeys([agent_label(a) for a in config.agents] + [r["agent"] for r in runs]))
    task_names = list(dict.fromkeys(list(config.tasks) + [r["task"] for r in runs]))
    runs = sorted(runs, key=lambda r: (task_names.index(r["task"]), labels.index(r["agent"]), r["seed"]))
    summary = summarize(runs, labels, task_names, groups=task_suites(task_names))
    write_json_atomic(out / "results.json", {"schema": SCHEMA, "config": config.to_dict(), "versions": versions(),
                                              "chance_score": CHANCE_SCORE, "summary": summary, "runs": runs})
    pd.DataFrame([{c: r.get(c) for c in CSV_COLUMNS} for r in runs], columns=CSV_COLUMNS).to_csv(
        out / "results.csv", index=False)
    plots = write_plots(out, runs, labels, task_names, summary)
    (out / "summary.md").write_text(summary_markdown(config, summary, plots))
    return summary


def task_suites(task_names: Sequence[str]) -> dict[str, list[str]]:
    """suite -> the tasks of `task_names` registered in it ("bundled", "hard", "paper"; "other" for the rest)."""
    from tasks.registry import SPECS

    suites: dict[str, list[str]] = {}
    for name in task_names:
        suites.setdefault(SPECS[name].suite if name in SPECS else "other", []).append(name)
    return suites


def group_rows(group: dict[str, Any], digits: int = 2) -> list[list[str]]:
    """One suite's comparison: per agent the final's IQM and mean, the mean gain over step 0, P(reference > agent)
    and the share of tasks where the reference's final is above the agent's (for the reference: above its step 0)."""
    def cell(estimates: dict[str, Any], key: str) -> str:
        return _interval(estimates[key], digits) if key in estimates else "—"

    gain_means = {agent: found["mean"] for agent, found in group["gain"].items()}
    return [[agent, _interval(found["iqm"], digits), _interval(found["mean"], digits), cell(gain_means, agent),
             cell(group["probability_of_improvement"], agent),
             cell(group["task_shares"], "step 0" if agent == REFERENCE_AGENT else agent)]
            for agent, found in group["final"].items()]


def group_markdown(summary: dict[str, Any]) -> list[str]:
    """summary.md's per-suite section: the aggregates of `final` within each suite the tasks come from."""
    if not summary.get("by_group"):
        return []
    lines = [f"Per suite: `final` and its gain over step 0 within each suite's tasks (the same estimators); the last "
             f"column is the share of the suite's tasks where {REFERENCE_AGENT}'s final is above the agent's "
             f"({REFERENCE_AGENT}'s row: above its own step 0).", ""]
    for name, group in summary["by_group"].items():
        lines += [f"Suite `{name}` ({len(group['tasks'])} task(s): {', '.join(group['tasks'])}):", "",
                  markdown_table(GROUP_HEADER, group_rows(group)), ""]
    return lines


def summary_markdown(config: BenchConfig, summary: dict[str, Any], plots: Sequence[str]) -> str:
    env = config.env
    lines = [
        "# Benchmark summary",
        "",
        f"Agents: {', '.join(config.agents)}. Tasks: {', '.join(config.tasks)}. Seeds: {config.seeds}.",
        f"Budget: {config.budget} training env steps per (agent, task, seed); the policy is evaluated on "
        f"{config.eval_episodes} fresh episodes at env steps {config.eval_points} (episodes of at most "
        f"{env.max_attempts} attempts, mode `{env.mode}`, reward `{env.reward}`, prompts `{env.prompt_style}`); "
        f"model `{config.model}`, sandbox `{config.sandbox}`.",
        "",
        f"Scores are {_scale_sentence(summary['scale'])} of each "
        "evaluation episode's final program on the held-out test part; an episode in which nothing ran, or whose "
        f"program failed on test, counts as a constant predictor (ROC AUC {CHANCE_SCORE}). `final`: mean over the "
        "episodes at the full budget; `final − step 0`: its gain over the step-0 evaluation (paired by seed); "
        "`AUC`: mean over the evaluation points; `search`: the best-on-dev program of training (of the step-0 "
        "episodes for an agent that does not learn) scored on test, what best-of-N sampling reports; `success`: "
        "share of final episodes whose program has a test score; `attempts`: attempts until the first program ran. "
        "Values are mean ± half-width of the 95% t-interval over seeds (n/a with one seed); `overall`: per seed "
        "the mean over tasks, then mean ± CI over seeds.",
        "",
        "The primary metric is `final`: the normalized test score of each evaluation episode's final program, what "
        "a user of the agent gets, on rows no reward ever scored.",
        "",
        markdown_table(TABLE_HEADER, table_rows(summary)),
        "",
        "Where learning shows first: a policy must write programs that run before their scores can rise, and the "
        "learners maximise the env's reward. First-attempt validity (share of episodes whose first program ran), "
        "the episode return under the env's reward, and the attempts until the first program that ran (episodes "
        "where one did; lower is better), at the full budget and their gain over step 0 (paired by seed).",
        "",
        markdown_table(LEARNING_HEADER, learning_rows(summary)),
        "",
    ]
    if summary["aggregates"]["final"]:
        tasks = summary["aggregate_tasks"]
        lines += [
            f"Aggregates of `final` over {len(tasks)} task(s) ({', '.join(tasks)}) and the seeds every agent ran: "
            "interquartile mean and mean with 95% stratified-bootstrap intervals (rliable's estimators), and the "
            f"probability that {REFERENCE_AGENT} beats each agent on a task.",
            "",
            markdown_table(aggregate_header(summary), aggregate_rows(summary, digits=3)),
            "",
        ]
        if shares := summary.get("task_shares"):
            lines += [f"Share of tasks where {REFERENCE_AGENT}'s final (mean over seeds) is above its own step 0 and "
                      "above each agent's final (the paper's \"improved on 70% of tasks\" form), with 95% intervals "
                      "from resampling the seeds of each task: " + "; ".join(
                          f"{'its step 0' if name == 'step 0' else name} {_interval(found, 2)}"
                          for name, found in shares.items()) + ".", ""]
        lines += group_markdown(summary)
        for key in ("validity_final", "validity_gain", "return_final", "return_gain"):
            if summary["aggregates"].get(key):
                prefix, part = key.split("_")
                lines += [f"Aggregates of {LEARNING_LABELS[prefix]} ({'final' if part == 'final' else 'gain over step 0'}):",
                          "", markdown_table(aggregate_header(summary), aggregate_rows(summary, key, digits=3)), ""]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _scale_sentence(scale: str) -> str:
    if scale == "normalized":
        return "normalized test scores (0 = the task's baseline pipeline, 1 = its reference pipeline)"
    return "raw test scores (ROC AUC; some task has no stored reference scores for its rows, so none is normalized)"


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
def write_plots(out: Path, runs: list[dict], agents: Sequence[str], task_names: Sequence[str],
                summary: dict[str, Any] | None = None) -> list[str]:
    """Evaluation curves, final-score bars, aggregate intervals and performance profiles (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.get("curve")]
    if not runs:
        return []
    summary = summary or summarize(runs, agents, task_names)
    tasks_with_runs = [t for t in task_names if any(r["task"] == t for r in runs)]
    scale = summary["scale"]
    figures = {
        "learning_gains.png": _gain_curves(plt, runs, agents, tasks_with_runs, scale),
        "eval_curves.png": _eval_curves(plt, runs, agents, tasks_with_runs, scale),
        **{name: _eval_curves(plt, runs, agents, tasks_with_runs, LEARNING_METRICS[prefix], LEARNING_LABELS[prefix])
           for name, prefix in LEARNING_CURVES.items()},
        "final_scores.png": _final_bars(plt, summary, agents, tasks_with_runs),
        "aggregates.png": _aggregate_intervals(plt, summary),
        "performance_profiles.png": _profiles(plt, runs, agents, task_names, scale),
    }
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(str(out / name))
    return written


def _curve_band(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and 95% t-interval half-width per point over seeds (zero width with one seed)."""
    stacked = np.array(curves, dtype=float)
    means, halves = zip(*(mean_ci(list(stacked[:, j])) for j in range(stacked.shape[1])))
    return np.array(means), np.nan_to_num(np.array(halves))


def _eval_curves(plt: Any, runs: list[dict], agents: Sequence[str], tasks: Sequence[str], key: str,
                 label: str | None = None) -> Any:
    """Curves of one evaluation-point `key` (the primary scale, or a learning metric), one panel per task."""
    panels = [*tasks, "all tasks"] if len(tasks) > 1 else list(tasks)
    columns = min(PLOT_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for agent in agents:
            curves = _panel_curves(runs, agent, panel, tasks, key)
            if not curves:
                continue
            steps = _points(runs, agent)
            mean, half = _curve_band(curves)
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{agent} (n={len(curves)})")
            ax.fill_between(steps, mean - half, mean + half, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(panel)
        ax.set_xlabel("training env steps")
        ax.set_ylabel(label or SCALE_LABELS[key])
        ax.grid(alpha=0.3)
    _legend(axes.flat[0])
    title = f"evaluation of the policy: {label or SCALE_LABELS[key]} (mean ± 95% CI over seeds)"
    fig.suptitle(textwrap.fill(title, width=int(40 * columns)), fontsize=10)  # one panel is narrow: wrap, not cut
    fig.tight_layout()
    return fig


def _gain_curves(plt: Any, runs: list[dict], agents: Sequence[str], tasks: Sequence[str], scale: str) -> Any:
    """The figure for a talk: per metric (the primary score, first-attempt validity, episode return) a column; top,
    where each agent stands at every point (mean and 95% t-band over seeds, per seed the mean over tasks); bottom,
    what training changed: its gain over its own step-0 evaluation, paired by seed. A bottom band clear of the zero
    line is learning the seeds agree on."""
    metrics = [(scale, SCALE_LABELS[scale]),
               *((LEARNING_METRICS[p], LEARNING_LABELS[p]) for p in ("validity", "return"))]
    fig, axes = plt.subplots(2, len(metrics), figsize=(4.6 * len(metrics), 7.0), squeeze=False, sharex=True)
    for column, (key, label) in enumerate(metrics):
        level_ax, gain_ax = axes[0, column], axes[1, column]
        gain_ax.axhline(0.0, color="black", linewidth=1.0)
        for agent in agents:
            band = curve_bands(runs, agent, tasks, key)
            if band is None:
                continue
            (line,) = level_ax.plot(band.points, band.level, marker="o", markersize=4, linewidth=2,
                                    label=f"{agent} (n={band.seeds})")
            level_ax.fill_between(band.points, band.level - band.level_half, band.level + band.level_half,
                                  color=line.get_color(), alpha=0.15, linewidth=0)
            gain_ax.plot(band.points, band.gain, marker="o", markersize=4, linewidth=2, color=line.get_color())
            gain_ax.fill_between(band.points, band.gain - band.gain_half, band.gain + band.gain_half,
                                 color=line.get_color(), alpha=0.18, linewidth=0)
        level_ax.set_title(label, fontsize=11)
        gain_ax.set_title(f"{label}: gain over step 0", fontsize=11)
        gain_ax.set_xlabel("training env steps")
        for ax in (level_ax, gain_ax):
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, frameon=False)
    where = f"mean over {len(tasks)} tasks" if len(tasks) > 1 else tasks[0]
    fig.suptitle(f"evaluation of the policy on fresh episodes, {where}: mean and 95% CI over seeds; "
                 "gains paired by seed", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def _panel(tasks: Sequence[str]) -> str:
    return "all tasks" if len(tasks) > 1 else tasks[0]


class CurveBands(NamedTuple):
    """One agent's evaluation-point metric over seeds: the level (mean, 95% t half-width) and its gain over the
    agent's own step 0, paired by seed."""

    points: list[int]
    level: np.ndarray
    level_half: np.ndarray
    gain: np.ndarray
    gain_half: np.ndarray
    seeds: int


def curve_bands(runs: list[dict], agent: str, tasks: Sequence[str], key: str) -> CurveBands | None:
    """An agent's `key` at every evaluation point (per seed the mean over `tasks`), level and gain over step 0 paired
    by seed, or None where it has no complete curve."""
    curves = _panel_curves(runs, agent, _panel(tasks), tasks, key)
    if not curves:
        return None
    level, level_half = _curve_band(curves)
    gain, gain_half = _curve_band([[value - curve[0] for value in curve] for curve in curves])
    return CurveBands(_points(runs, agent), level, level_half, gain, gain_half, len(curves))


def _points(runs: list[dict], agent: str) -> list[int]:
    """The evaluation points of an agent's runs (every run of a benchmark shares the schedule)."""
    return [p["point"] for p in next(r for r in runs if r["agent"] == agent)["curve"]]


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _panel_curves(runs: list[dict], agent: str, panel: str, tasks: Sequence[str], key: str) -> list[list[float]]:
    """Curves of one panel: per seed on one task, or per seed the mean over all tasks (seeds with every task);
    a curve with an unmeasured point (a record of an older schema) is left out."""
    mine = [r for r in runs if r["agent"] == agent and all(p.get(key) is not None for p in r["curve"])]
    if panel != "all tasks":
        return [[p[key] for p in r["curve"]] for r in mine if r["task"] == panel]
    by_seed: dict[int, list[dict]] = {}
    for r in mine:
        by_seed.setdefault(r["seed"], []).append(r)
    return [list(np.mean([[p[key] for p in r["curve"]] for r in rs], axis=0))
            for rs in by_seed.values() if {r["task"] for r in rs} >= set(tasks)]


def _final_bars(plt: Any, summary: dict[str, Any], agents: Sequence[str], tasks: Sequence[str]) -> Any:
    groups = [*tasks, *(["overall"] if summary["overall"] else [])]
    rows = {(row["task"], row["agent"]): row for row in [*summary["per_task"], *summary["overall"]]}
    fig, ax = plt.subplots(figsize=(min(16.0, max(5.0, 0.4 * len(groups) * max(1, len(agents)))), 3.8))
    width = 0.8 / max(1, len(agents))
    for i, agent in enumerate(agents):
        xs, heights, errors = [], [], []
        for g, group in enumerate(groups):
            row = rows.get((group, agent))
            if row is not None and not math.isnan(row["final"]):
                xs.append(g + (i - (len(agents) - 1) / 2) * width)
                heights.append(row["final"])
                errors.append(0.0 if math.isnan(row["final_ci"]) else row["final_ci"])
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=agent)
    if summary["scale"] == "normalized":  # 0 = the baseline pipeline, 1 = the reference pipeline
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(SCALE_LABELS[summary["scale"]])
    ax.set_title("final evaluation (mean ± 95% CI over seeds)", fontsize=10)
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _aggregate_intervals(plt: Any, summary: dict[str, Any]) -> Any:
    found = summary["aggregates"]["final"]
    if not found:
        return None
    agents = list(found)
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 0.45 * len(agents) + 1.4), sharey=True)
    for ax, name in zip(axes, ("iqm", "mean")):
        for y, agent in enumerate(agents):
            value, low, high = found[agent][name]
            ax.plot([low, high], [y, y], linewidth=6, alpha=0.5, solid_capstyle="butt")
            ax.plot([value], [y], "k|", markersize=12)
        ax.set_yticks(range(len(agents)), agents)
        ax.set_title(f"{name.upper() if name == 'iqm' else name} (95% bootstrap CI)", fontsize=9)
        ax.set_xlabel(SCALE_LABELS[summary["scale"]])
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _profiles(plt: Any, runs: list[dict], agents: Sequence[str], tasks: Sequence[str], scale: str) -> Any:
    matrices = score_matrices(runs, agents, tasks, "final", scale)
    if not matrices:
        return None
    values = np.concatenate([m.ravel() for m in matrices.values()])
    low = min(0.0, float(values.min())) if scale == "normalized" else min(CHANCE_SCORE, float(values.min()))
    taus = np.linspace(low, max(1.0, float(values.max())), 101)
    profiles = performance_profile(matrices, taus)
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for agent, found in profiles.items():
        (line,) = ax.plot(taus, found["profile"], label=agent)
        ax.fill_between(taus, found["low"], found["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(f"{SCALE_LABELS[scale]} τ")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_title("performance profiles (95% bootstrap CI)", fontsize=10)
    _legend(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------------------------
def make_console() -> Any:
    from rich.console import Console

    return Console()


def print_table(summary: dict[str, Any], console: Any = None) -> None:
    """The per-task and overall table, then the aggregates, each fitting 80 columns."""
    from rich import box
    from rich.table import Table

    console = console or make_console()
    n = max((row["n"] for row in summary["per_task"]), default=0)
    table = Table(title=f"{SCALE_LABELS[summary['scale']]} of the policy, mean ± 95% CI over seeds (n={n})",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False, title_style="bold")
    for name in CONSOLE_HEADER:
        table.add_column(name, justify="left" if name in ("task", "agent") else "right", no_wrap=True)
    for i, row in enumerate(console_rows(summary)):
        table.add_row(*row, end_section=(i == len(summary["per_task"]) - 1))
    console.print(table)
    console.print("final: at the full budget; gain: final − step 0 (paired by seed); AUC: mean over evaluation "
                  "points; search: best-on-dev program of training; ok: final episodes that ran.",
                  style="dim")
    learning = Table(title="where learning shows first: first-attempt validity and episode return",
                     box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False, title_style="bold")
    for name in ("task", "agent", "validity", "gain", "return", "gain"):
        learning.add_column(name, justify="left" if name in ("task", "agent") else "right", no_wrap=True)
    for i, row in enumerate([*summary["per_task"], *summary["overall"]]):
        learning.add_row(row["task"][:13], row["agent"][:13],
                         *(format_ci(row[key], row[f"{key}_ci"], 2)
                           for key in ("validity_final", "validity_gain", "return_final", "return_gain")),
                         end_section=(i == len(summary["per_task"]) - 1))
    console.print(learning)
    if summary["aggregates"]["final"]:
        aggregates = Table(title="final over tasks and seeds (95% bootstrap CI)", box=box.SIMPLE_HEAD,
                           padding=(0, 1), pad_edge=False, show_edge=False, title_style="bold")
        for name in aggregate_header(summary):
            aggregates.add_column(name, justify="left" if name == "agent" else "right", no_wrap=True)
        for row in aggregate_rows(summary):
            aggregates.add_row(*row)
        console.print(aggregates)
