"""Reward noise and cost of each split protocol: how much a fixed honest program's reward moves with the split seed,
and what one reward costs, measured side by side in one run.

    .venv/bin/python bench/reward_noise.py                       # titanic, credit_scoring, breast_cancer; 8 seeds
    .venv/bin/python bench/reward_noise.py --tasks titanic --seeds 4 --backend docker

Protocols compared (`tasks.splits.SplitProtocol`):
  paper        5 random 50/50 splits of the dev part (the ETPO paper; scored labels are fitted in other folds)
  holdout      one fit on the fitting rows, scored on the reward rows (no scored label enters a sandbox)
  holdout-3    3 fits on 80% subsamples of the fitting rows, each scored on the same reward rows
  holdout-5    5 such fits
Programs: the reference grid's logistic regression (deterministic) and the default forest of the hard suite's
headroom check (no random_state: the program's own randomness is part of its reward's noise). Per protocol and
task: the mean reward, its standard deviation over split seeds (mean over the programs), the test score of the same
program under that protocol, and the wall time of one reward (median over seeds, one sandbox, warm worker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

import tasks  # noqa: E402
from sandbox import Limits, make_sandbox  # noqa: E402
from tasks.reference import default_forest_program, grid_program  # noqa: E402
from tasks.splits import PAPER, SplitProtocol  # noqa: E402

PROTOCOLS = {
    "paper": PAPER,
    "holdout": SplitProtocol(),
    "holdout-3": SplitProtocol(n_splits=3, resample_fraction=0.8),
    "holdout-5": SplitProtocol(n_splits=5, resample_fraction=0.8),
}
PROGRAMS = {"logistic_regression": grid_program("logistic_regression"), "default_forest": default_forest_program()}


def measure(task_name: str, protocol: SplitProtocol, sandbox, seeds: int, advance) -> dict:
    task = tasks.get(task_name, split=protocol)
    stds, means, tests, seconds = [], [], [], []
    for program in PROGRAMS.values():
        rewards = []
        for seed in range(seeds):
            started = time.perf_counter()
            evaluation = tasks.evaluate(task, program, sandbox, "dev", seed)
            seconds.append(time.perf_counter() - started)
            if evaluation.score is None:
                raise RuntimeError(f"{task_name}: {evaluation.result.message}")
            rewards.append(evaluation.score)
            advance()
        stds.append(statistics.pstdev(rewards))
        means.append(statistics.fmean(rewards))
        tests.append(tasks.evaluate(task, program, sandbox, "test").score)
    return {"std": statistics.fmean(stds), "mean": statistics.fmean(means), "test": statistics.fmean(tests),
            "seconds": statistics.median(seconds), "fit_rows": len(task.dev_splits()[0].y_fit)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="titanic,credit_scoring,breast_cancer")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--backend", default="local")
    args = parser.parse_args(argv)
    names = args.tasks.split(",")
    total = len(names) * len(PROTOCOLS) * len(PROGRAMS) * args.seeds
    results: dict[tuple[str, str], dict] = {}
    with make_sandbox(args.backend, limits=Limits(wall_time_s=300.0, cpu_time_s=300)) as sandbox:
        tasks.evaluate(tasks.get(names[0]), PROGRAMS["logistic_regression"], sandbox)  # warm-up: starts the worker
        with Progress(transient=True) as progress:
            bar = progress.add_task("rewards", total=total)
            for name in names:
                for label, protocol in PROTOCOLS.items():
                    results[name, label] = measure(name, protocol, sandbox, args.seeds,
                                                   lambda: progress.advance(bar))
    table = Table(title=f"Reward noise and cost per protocol ({args.seeds} split seeds, {args.backend} sandbox)")
    for column in ("task", "protocol", "fit rows", "mean reward", "std over seeds", "test score", "s / reward",
                   "cost vs paper"):
        table.add_column(column, justify="left" if column in ("task", "protocol") else "right")
    for name in names:
        paper_seconds = results[name, "paper"]["seconds"]
        for label in PROTOCOLS:
            r = results[name, label]
            table.add_row(name, label, str(r["fit_rows"]), f"{r['mean']:.4f}", f"{r['std']:.4f}", f"{r['test']:.4f}",
                          f"{r['seconds']:.2f}", f"{r['seconds'] / paper_seconds:.2f}×")
    Console(width=132).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
