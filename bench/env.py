"""Throughput of DataSciCode-v0: env steps per second for one env and for N pooled envs.

    .venv/bin/python bench/env.py                       # breast_cancer, local sandbox, 4 envs
    .venv/bin/python bench/env.py --envs 8 --pool-size 4 --steps 48 --backend docker

Two workloads: the sandbox benchmark's honest program (a small random forest), and a mix of failing programs
(syntax error, exception, NaN predictions, missing import, wrong output shape; no timeouts, which would only
measure the time limit). Every setting is measured in this one run, after a warm-up step that starts the
sandbox workers, so the ratios compare like with like. "sandbox busy" is the share of the pool's capacity
(wall time x sandboxes) spent inside `Sandbox.run`; for one env, the rest of a step is the env's own work
(extraction, splits, scoring, prompts).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import etpo_env  # noqa: E402,F401  (registers DataSciCode-v0)
from etpo_env.env import DataSciCodeEnv  # noqa: E402
from etpo_env.vector import make_pooled_vec_env  # noqa: E402
from sandbox.safety import HONEST_PROGRAM  # noqa: E402

FAILING_PROGRAMS = [
    "return LogisticRegression(",  # syntax error
    "raise ValueError('bad hyperparameter')",  # exception in build_model
    "import numpy as np\nclass M:\n    def predict_proba(self, X):\n        return np.full((len(X), 2), np.nan)\n"
    "return M()",  # NaN predictions
    "import xgboost_not_installed\nreturn None",  # missing module
    "import numpy as np\nclass M:\n    def predict_proba(self, X):\n        return np.ones((3, 2))\nreturn M()",  # shape
]
WORKLOADS = {"honest": [HONEST_PROGRAM], "failing mix": FAILING_PROGRAMS}


def bench_single(task, backend: str, programs: list[str], steps: int) -> dict:
    """One env stepping alone; episodes reset whenever they end."""
    env = DataSciCodeEnv(task=task, sandbox=backend, max_attempts=10**6, mode="refine", record_timings=True)
    env.reset(seed=0)
    env.step(programs[0])  # warm-up: starts the sandbox worker
    actions = itertools.cycle(programs)
    inside = []
    started = time.perf_counter()
    for _ in range(steps):
        *_, info = env.step(next(actions))
        inside.append(info["duration_s"])
    elapsed = time.perf_counter() - started
    env.close()
    return {"steps": steps, "seconds": elapsed, "sandbox_share": sum(inside) / elapsed}


def bench_pooled(task, backend: str, programs: list[str], steps: int, n_envs: int, pool_size: int) -> dict:
    """`n_envs` envs in one process sharing `pool_size` sandboxes, stepped together by a thread pool."""
    envs = make_pooled_vec_env(num_envs=n_envs, pool_size=pool_size, sandbox=backend, task=task,
                               max_attempts=10**6, mode="refine", record_timings=True)
    envs.reset(seed=0)
    envs.step((programs[0],) * n_envs)  # warm-up: starts every sandbox of the pool
    actions = itertools.cycle(programs)
    rounds = max(1, steps // n_envs)
    inside = []
    started = time.perf_counter()
    for _ in range(rounds):
        *_, infos = envs.step(tuple(next(actions) for _ in range(n_envs)))
        inside.append(float(sum(infos["duration_s"])))
    elapsed = time.perf_counter() - started
    envs.close()
    return {"steps": rounds * n_envs, "seconds": elapsed, "sandbox_share": sum(inside) / elapsed / pool_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--backend", default="local", help="sandbox backend (auto, docker, local, unsafe-process)")
    parser.add_argument("--envs", type=int, default=4, help="envs in the pooled setting")
    parser.add_argument("--pool-size", type=int, default=None, help="sandboxes shared by them (default: --envs)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per setting")
    args = parser.parse_args(argv)

    import tasks

    task = tasks.get(args.task)
    pool_size = args.pool_size or args.envs
    print(f"DataSciCode-v0 throughput: task {task.name} ({task.n_rows} rows, {len(task.dev_splits())} dev "
          f"splits per step), backend {args.backend}, {os.cpu_count()} CPUs, {args.steps} timed steps per row")
    print(f"{'workload':<13} {'setting':<28} {'steps':>5} {'seconds':>8} {'steps/s':>8} {'vs 1 env':>8} "
          f"{'sandbox busy':>13}")
    for workload, programs in WORKLOADS.items():
        rows = [
            ("1 env", bench_single(task, args.backend, programs, args.steps)),
            (f"{args.envs} envs, pool of {pool_size}",
             bench_pooled(task, args.backend, programs, args.steps, args.envs, pool_size)),
        ]
        single_rate = rows[0][1]["steps"] / rows[0][1]["seconds"]
        for setting, row in rows:
            rate = row["steps"] / row["seconds"]
            print(f"{workload:<13} {setting:<28} {row['steps']:>5} {row['seconds']:>8.2f} {rate:>8.2f} "
                  f"{rate / single_rate:>7.2f}x {row['sandbox_share']:>12.0%}")
    load = os.getloadavg()[0]
    print(f"Each figure is one timed run (rerun to see the spread); 1-minute load average at the end: {load:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
