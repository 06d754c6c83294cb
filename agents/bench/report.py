"""Reports of a benchmark: the results folder (results.json, results.csv, summary.md, plots) and the console table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from agents.bench.config import BenchConfig, agent_label
from agents.bench.statistics import CHANCE_SCORE, format_ci, summarize

PLOT_COLUMNS = 4  # learning-curve panels per row

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


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                             "machine": platform.machine(), "cpu_count": os.cpu_count()}
    for name in ("etpo-gym", "torch", "transformers", "peft", "gymnasium", "numpy", "pandas", "scikit-learn"):
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
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


CSV_COLUMNS = ["agent", "agent_spec", "task", "seed", "budget", "env_steps", "episodes", "learner", "dev_successes",
               "dev_score", "test_status", "test_score", "success", "score", "normalized", "train_time_s", "test_time_s", "wall_time_s", "error"]


def write_outputs(out: Path, config: BenchConfig, runs: list[dict[str, Any]]) -> dict[str, list[dict]]:
    """results.json, results.csv, summary.md and the plots, from every cell file in the folder."""
    import pandas as pd

    labels = list(dict.fromkeys([agent_label(a) for a in config.agents] + [r["agent"] for r in runs]))
    task_names = list(dict.fromkeys(list(config.tasks) + [r["task"] for r in runs]))
    runs = sorted(runs, key=lambda r: (task_names.index(r["task"]), labels.index(r["agent"]), r["seed"]))
    summary = summarize(runs, labels, task_names)
    write_json_atomic(out / "results.json", {"config": config.to_dict(), "versions": versions(),
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
        f"Budget: {config.budget} env steps per (agent, task, seed); episodes of at most {config.env.max_attempts} "
        f"steps, mode `{config.env.mode}`, reward `{config.env.reward}`, prompts `{config.env.prompt_style}`, model "
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


def make_console() -> Any:
    from rich.console import Console

    return Console()


def print_table(summary: dict[str, list[dict]], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or make_console()
    table = Table(title="test score (mean ± 95% CI over seeds)", box=box.SIMPLE_HEAD)
    for name in TABLE_HEADER:
        table.add_column(name, justify="left" if name in ("task", "agent") else "right")
    rows = table_rows(summary)
    n_task_rows = len(summary["per_task"])
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=(i == n_task_rows - 1))
    if not console.is_terminal and console.width < 120:  # a log file has no width limit: keep rows unwrapped
        console = Console(file=console.file, width=120)
    console.print(table)
