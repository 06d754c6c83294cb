"""The benchmark harness: agents × tasks × seeds under one env-step budget.

    from agents.bench import run_benchmark

    result = run_benchmark(["etpo", "ppo", "scripted"], ["breast_cancer"], seeds=3, budget=64, sandbox="local")

- `run`: the cells (train/act within the budget, score the chosen program on the test part), resume, the runner;
- `statistics`: means with 95% t-intervals per task and overall;
- `report`: results.json, results.csv, summary.md, the plots and the console table;
- `cli`: `etpo bench` and `etpo demo`.
"""

from agents.bench.config import BenchConfig, agent_label, run_file_name
from agents.bench.report import (
    CSV_COLUMNS,
    TABLE_HEADER,
    markdown_table,
    print_table,
    summary_markdown,
    table_rows,
    write_outputs,
    write_plots,
)
from agents.bench.run import (
    SUITES,
    act_for_budget,
    check_resumable,
    load_runs,
    resolve_tasks,
    run_benchmark,
    run_cell,
    seed_everything,
)
from agents.bench.statistics import CHANCE_SCORE, format_ci, mean_ci, summarize

__all__ = ["CHANCE_SCORE", "CSV_COLUMNS", "SUITES", "TABLE_HEADER", "BenchConfig", "act_for_budget", "agent_label",
           "check_resumable", "format_ci", "load_runs", "markdown_table", "mean_ci", "print_table", "resolve_tasks",
           "run_benchmark", "run_cell", "run_file_name", "seed_everything", "summarize", "summary_markdown",
           "table_rows", "write_outputs", "write_plots"]
