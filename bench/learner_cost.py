"""What each learner costs per env step and per update, side by side in one run: ETPO (policy + token-level critic,
EMA target), PPO (policy + value head) and GRPO (policy only, no critic pass), each with its default config.

    .venv/bin/python bench/learner_cost.py                          # tiny model, breast_cancer, 32 env steps
    .venv/bin/python bench/learner_cost.py --agents etpo,grpo --budget 64 --repeats 2

Each learner trains in a process of its own (so its peak resident memory is its own), on the same task, seed and
budget, handed one env under an `EnvStepBudget` as a benchmark cell hands it. Printed per learner: env steps/s of the
whole run, the phase breakdown from the learner's own timers (generation, sandbox, update), update seconds per
update, peak resident memory of the process, and each figure's ratio to ETPO's. With `--repeats N` the learners run
interleaved N times and the medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import gymnasium as gym

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(agent_name: str, model: str, task: str, budget: int, seed: int, sandbox: str) -> dict:
    """Train one learner in this process; its timings and this process's peak resident memory."""
    import torch

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from agents.registry import build_agent
    from agents.tiny import ensure_tiny_model
    from etpo_env.wrappers import EnvStepBudget

    torch.manual_seed(seed)
    model_path = ensure_tiny_model() if model == "tiny" else model
    env = EnvStepBudget(gym.make("DataSciCode-v0", task=task, max_attempts=1, sandbox=sandbox), budget)
    agent = build_agent(agent_name, seed=seed, model=str(model_path))
    phases = {"generation": 0.0, "sandbox": 0.0, "update": 0.0}
    updates = 0

    def record(stats: dict) -> None:
        nonlocal updates
        updates += 1
        for phase in phases:
            phases[phase] += stats[f"time_{phase}_s"]

    try:
        started = time.perf_counter()
        summary = agent.learn(env, budget, callbacks=record)
        wall = time.perf_counter() - started
    finally:
        env.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"env_steps": summary["env_steps"], "wall_s": wall, "updates": updates,
            "env_steps_per_s": summary["env_steps"] / wall, "peak_rss_mb": peak_mb,
            "update_s_per_update": phases["update"] / max(updates, 1), **{f"{k}_s": v for k, v in phases.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="etpo,ppo,grpo")
    parser.add_argument("--model", default="tiny", help="'tiny' (built if missing) or a model path")
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--budget", type=int, default=32, help="env steps per learner (two default updates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sandbox", default="local")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train this learner here, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.model, args.task, args.budget, args.seed, args.sandbox)))
        return 0
    agents = args.agents.split(",")
    rows: dict[str, list[dict]] = {name: [] for name in agents}
    for _ in range(args.repeats):
        for name in agents:
            command = [sys.executable, os.path.abspath(__file__), "--one", name, "--model", args.model,
                       "--task", args.task, "--budget", str(args.budget), "--seed", str(args.seed),
                       "--sandbox", args.sandbox]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    base = median.get("etpo") or median[agents[0]]
    print(f"{args.task}, {args.budget} env steps per learner, seed {args.seed}, {args.sandbox} sandbox, "
          f"{os.cpu_count()} cores, {args.repeats} repeat(s) (medians)")
    print(f"{'learner':<8} {'steps/s':>8} {'vs etpo':>8} {'gen s':>7} {'sandbox s':>9} {'update s':>9} "
          f"{'s/update':>9} {'vs etpo':>8} {'peak RSS MiB':>13} {'vs etpo':>8}")
    for name, r in median.items():
        print(f"{name:<8} {r['env_steps_per_s']:>8.2f} {r['env_steps_per_s'] / base['env_steps_per_s']:>7.2f}x "
              f"{r['generation_s']:>7.1f} {r['sandbox_s']:>9.1f} {r['update_s']:>9.1f} "
              f"{r['update_s_per_update']:>9.1f} {r['update_s_per_update'] / base['update_s_per_update']:>7.2f}x "
              f"{r['peak_rss_mb']:>13.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
