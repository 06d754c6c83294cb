"""The benchmark report's bootstrap of P(etpo > agent): rliable's estimator against `pairwise_improvement`.

    .venv/bin/python bench/report_statistics.py                  # 20 tasks × 3 seeds × 7 agents, 200 resamples
    .venv/bin/python bench/report_statistics.py --tasks 13 --reps 2000

A benchmark summary reports the probability that ETPO beats each agent on six metrics, each with a 95% interval
from a few thousand resamples of the runs within each task. Both estimators score the same resamples (same seed),
side by side in this run; it prints their times, the ratio and the largest difference between their values. The
scores are random with many ties (quarter steps), as a benchmark's mostly-equal prompting runs are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from rliable import metrics  # noqa: E402

from agents.benchmark.statistics import AGGREGATED, _resample, pairwise_improvement  # noqa: E402


def bootstrap_seconds(estimator, matrices: list[dict[str, np.ndarray]], reps: int) -> tuple[float, np.ndarray]:
    """Seconds to score `reps` resamples of etpo against every agent on every metric, and the scores."""
    start, found = time.perf_counter(), []
    for per_agent in matrices:
        for other in per_agent:
            rng = np.random.default_rng(0)
            found.append([estimator(_resample(per_agent["etpo"], rng), _resample(per_agent[other], rng))
                          for _ in range(reps)])
    return time.perf_counter() - start, np.array(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--agents", type=int, default=7)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    agents = ["etpo", *(f"agent{k}" for k in range(1, args.agents))]
    matrices = [{a: rng.integers(0, 5, size=(args.seeds, args.tasks)) / 4 for a in agents} for _ in AGGREGATED]
    rliable_s, rliable_values = bootstrap_seconds(metrics.probability_of_improvement, matrices, args.reps)
    ours_s, our_values = bootstrap_seconds(pairwise_improvement, matrices, args.reps)
    print(f"{args.reps} resamples × {len(AGGREGATED)} metrics × {args.agents} agents, {args.tasks} tasks × "
          f"{args.seeds} seeds: rliable {rliable_s:.1f} s, pairwise_improvement {ours_s:.2f} s, "
          f"{rliable_s / ours_s:.0f}× faster; largest difference {np.abs(rliable_values - our_values).max():.1e}")


if __name__ == "__main__":
    main()
