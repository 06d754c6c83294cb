"""The benchmark harness: agents × tasks × seeds under one env-step budget.

    from agents.benchmark import run_benchmark

    result = run_benchmark(["etpo", "ppo", "scripted"], ["breast_cancer"], seeds=3, budget=64, eval_every=16,
                           eval_episodes=5, sandbox="local")

- `run`: the cells (train in cumulative budget chunks, evaluate the policy on fresh episodes at fixed points, score
  each episode's final program on the test part), resume, the local and Ray runners;
- `statistics`: means with 95% t-intervals per task and overall; bootstrap aggregates (IQM, mean, probability of
  improvement, performance profiles);
- `report`: results.json, results.csv, summary.md, the plots and the console table;
- `cli`: `etpo bench` and `etpo demo`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public names -> the submodule defining them; loaded on first use, so `etpo --version` (which registers
# `agents.benchmark.cli`) does not import the runner, pandas or matplotlib.
_EXPORTS = {
    "config": ["SCHEMA", "BenchConfig", "agent_label", "run_file_name"],
    "report": ["CSV_COLUMNS", "PLOTS", "TABLE_HEADER", "markdown_table", "print_table", "summary_markdown",
               "table_rows", "write_outputs", "write_plots"],
    "episodes": ["TestScorer", "batch_actor", "eval_seed", "evaluate_point", "isolated_rng", "learns",
                 "play_eval_episodes", "point_summary", "probe_rate"],
    "record": ["CellRecord"],
    "run": ["IncomparableResults", "check_resumable", "load_runs", "resolve_tasks", "run_benchmark", "run_cell",
            "run_cell_isolated", "seed_everything", "unrun_cell_record"],
    "statistics": ["CHANCE_SCORE", "aggregate_estimates", "format_ci", "group_summary", "mean_ci",
                   "pairwise_improvement", "performance_profile", "probability_of_improvement_estimates",
                   "run_metrics", "score_matrices", "stratified_bootstrap", "summarize", "task_share_estimates"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'agents.benchmark' has no attribute {name!r}")
    return getattr(importlib.import_module(f"agents.benchmark.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
