"""ETPO training throughput: the learners' old collection path (one env, one action generated per call, the adapter
applied unmerged) against the new defaults (handed the same single env, the learner steps `num_envs` envs spawned
from it, generates each round's actions in one batched call with the adapter merged into the base weights, and
runs the round's programs side by side on the sandbox's slots), side by side in one process. With `--overlapped`, a
third run adds `overlap_generation=on` (half the envs generate while the other half's programs run; the default
turns it on on CUDA only).

    .venv/bin/python bench/train_throughput.py --model tiny     # tiny model, breast_cancer, 1 attempt, seed 0
    .venv/bin/python bench/train_throughput.py --model tiny --budget 64 --num-envs 8
    .venv/bin/python bench/train_throughput.py --overlapped
    .venv/bin/python bench/train_throughput.py --repeats 3       # interleaved repeats, ratios of the medians

Both runs train the same ETPO config for the same env-step budget on the same task and seed, each handed one env
under an `EnvStepBudget` (as a benchmark cell hands it); only `num_envs` and `runtime.merge_for_generation` differ,
so the update (the same work per env step in both) is common to both runs. Printed per run: tokens/s of
generation, env steps/s of the whole run, the phase breakdown (generation, sandbox, update, other) from the
learner's own timers, that the budget wrapper counted every step, and how busy the machine's cores were over the
run (both runs keep two cores busy: the speed-up is less work per env step, not more cores). `--repeats N` runs
the configurations N times, interleaved (old, new, old, new, ...) so drift in the machine's load reaches both alike,
and prints each repeat's ratio; the ratios are then those of the per-configuration medians. The last line is
`speed-up: env_steps_per_s N.NNx, tokens_per_s N.NNx`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import gymnasium as gym


def cpu_times() -> tuple[float, float] | None:
    """(busy, total) seconds of all of the machine's cores so far (psutil; None where it is missing)."""
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle, sum(times)


def cpu_busy(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float:
    """The fraction of the machine's core time that was busy between two `cpu_times` readings (nan if unknown)."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def speed_up(base: list[dict], new: list[dict], key: str) -> tuple[float, list[float]]:
    """`key`'s ratio new/base of the two configurations' medians over their repeats, and each repeat's own ratio
    (repeat i of the new configuration against repeat i of the base one)."""
    ratio = lambda n, b: n / b if b else float("inf")  # noqa: E731
    per_repeat = [ratio(n[key], b[key]) for b, n in zip(base, new, strict=True)]
    return ratio(statistics.median(r[key] for r in new), statistics.median(r[key] for r in base)), per_repeat


def run(model: str, task: str, budget: int, seed: int, sandbox: str, **learner_options) -> dict:
    import torch

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from agents.etpo import ETPOAgent
    from etpo_env.wrappers import EnvStepBudget

    torch.manual_seed(seed)
    env = EnvStepBudget(gym.make("DataSciCode-v0", task=task, max_attempts=1, sandbox=sandbox), budget)
    agent = ETPOAgent(model=model, seed=seed, **learner_options)
    phases = {"generation": 0.0, "sandbox": 0.0, "update": 0.0}
    tokens = 0

    def record(stats: dict) -> None:
        nonlocal tokens
        phases["generation"] += stats["time_generation_s"]
        phases["sandbox"] += stats["time_sandbox_s"]
        phases["update"] += stats["time_update_s"]
        tokens += int(stats["generated_tokens"])

    try:
        cpu_before = cpu_times()
        started = time.perf_counter()
        summary = agent.learn(env, budget, callbacks=record)
        wall = time.perf_counter() - started
        busy = cpu_busy(cpu_before, cpu_times())
    finally:
        env.close()
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return {"env_steps": summary["env_steps"], "wrapper_steps": env.steps, "statuses": len(env.statuses),
            "wall_s": wall, "tokens": tokens, "cpu_busy": busy,
            "tokens_per_s": tokens / phases["generation"] if phases["generation"] else 0.0,
            "env_steps_per_s": summary["env_steps"] / wall, **{f"{k}_s": v for k, v in phases.items()}}


def main(argv: list[str] | None = None) -> int:
    from agents.etpo import ETPOConfig

    defaults = ETPOConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built if missing) or a model path")
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--budget", type=int, default=32, help="env steps per run (two default updates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=defaults.num_envs,
                        help="envs of the batched run (default: the learner's default)")
    parser.add_argument("--sandbox", default="local")
    parser.add_argument("--overlapped", action="store_true",
                        help="also run the new defaults with overlap_generation=on (auto turns it on on CUDA only)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every configuration this many times, interleaved; the ratios are of the medians")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    batched = {"num_envs": args.num_envs, "rollout_steps": max(defaults.rollout_steps, args.num_envs)}
    runs = {
        "one env, unbatched": {"num_envs": 1, "merge_for_generation": False, "overlap_generation": "off"},
        f"{args.num_envs} envs, batched": batched,
    }
    if args.overlapped:
        runs[f"{args.num_envs} envs, overlapped"] = {**batched, "overlap_generation": "on"}
    rows: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, options in runs.items():
            rows[name].append(run(args.model, args.task, args.budget, args.seed, args.sandbox, **options))
    import torch

    print(f"{args.task}, {args.budget} env steps per run, seed {args.seed}, {args.sandbox} sandbox, {os.cpu_count()} cores, "
          f"torch {torch.get_num_threads()} threads, {args.repeats} repeat(s)")
    header = f"{'run':<25} {'env steps':>9} {'counted':>7} {'wall s':>7} {'steps/s':>8} {'tokens':>7} " \
             f"{'tokens/s':>9} {'gen s':>7} {'sandbox s':>9} {'update s':>8} {'other s':>7} {'cpu busy':>8}"
    print(header)
    for name, repeats in rows.items():
        for k, r in enumerate(repeats):
            label = name if args.repeats == 1 else f"{name} #{k + 1}"
            print(f"{label:<25} {r['env_steps']:>9.0f} {r['wrapper_steps']:>7d} {r['wall_s']:>7.1f} "
                  f"{r['env_steps_per_s']:>8.2f} {r['tokens']:>7d} {r['tokens_per_s']:>9.0f} {r['generation_s']:>7.1f} "
                  f"{r['sandbox_s']:>9.1f} {r['update_s']:>8.1f} {r['other_s']:>7.1f} {r['cpu_busy']:>8.0%}")
    base, new = list(rows.values())[:2]
    steps, steps_each = speed_up(base, new, "env_steps_per_s")
    tokens, tokens_each = speed_up(base, new, "tokens_per_s")
    if args.repeats > 1:
        each = lambda values: ", ".join(f"{v:.2f}x" for v in values)  # noqa: E731
        print(f"per repeat: env_steps_per_s {each(steps_each)}; tokens_per_s {each(tokens_each)} "
              "(the last line: ratios of the medians)")
    print(f"speed-up: env_steps_per_s {steps:.2f}x, tokens_per_s {tokens:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
