"""ETPO training throughput: the learners' old collection path (one env, one action generated per call, the adapter
applied unmerged) against the new defaults (handed the same single env, the learner steps `num_envs` envs spawned
from it, generates each round's actions in one batched call with the adapter merged into the base weights, and
runs the round's programs side by side on the sandbox's slots), side by side in one process. With `--overlapped`, a
third run adds `overlap_generation=on` (half the envs generate while the other half's programs run; the default
turns it on on CUDA only).

    .venv/bin/python bench/train_throughput.py --model tiny     # tiny model, breast_cancer, 1 attempt, seed 0
    .venv/bin/python bench/train_throughput.py --model tiny --budget 64 --num-envs 8
    .venv/bin/python bench/train_throughput.py --overlapped

Both runs train the same ETPO config for the same env-step budget on the same task and seed, each handed one env
under an `EnvStepBudget` (as a benchmark cell hands it); only `num_envs` and `runtime.merge_for_generation` differ,
so the update (the same work per env step in both) is common to both runs. Printed per run: tokens/s of
generation, env steps/s of the whole run, the phase breakdown (generation, sandbox, update, other) from the
learner's own timers, and that the budget wrapper counted every step. The last line is
`speed-up: env_steps_per_s N.NNx, tokens_per_s N.NNx`.
"""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym


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
        started = time.perf_counter()
        summary = agent.learn(env, budget, callbacks=record)
        wall = time.perf_counter() - started
    finally:
        env.close()
    phases["other"] = max(0.0, wall - sum(phases.values()))
    return {"env_steps": summary["env_steps"], "wrapper_steps": env.steps, "statuses": len(env.statuses),
            "wall_s": wall, "tokens": tokens,
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
    args = parser.parse_args(argv)

    batched = {"num_envs": args.num_envs, "rollout_steps": max(defaults.rollout_steps, args.num_envs)}
    runs = {
        "one env, unbatched": {"num_envs": 1, "merge_for_generation": False, "overlap_generation": "off"},
        f"{args.num_envs} envs, batched": batched,
    }
    if args.overlapped:
        runs[f"{args.num_envs} envs, overlapped"] = {**batched, "overlap_generation": "on"}
    rows = {name: run(args.model, args.task, args.budget, args.seed, args.sandbox, **options)
            for name, options in runs.items()}
    header = f"{'run':<22} {'env steps':>9} {'counted':>7} {'wall s':>7} {'steps/s':>8} {'tokens':>7} " \
             f"{'tokens/s':>9} {'gen s':>7} {'sandbox s':>9} {'update s':>8} {'other s':>7}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<22} {r['env_steps']:>9.0f} {r['wrapper_steps']:>7d} {r['wall_s']:>7.1f} "
              f"{r['env_steps_per_s']:>8.2f} {r['tokens']:>7d} {r['tokens_per_s']:>9.0f} {r['generation_s']:>7.1f} "
              f"{r['sandbox_s']:>9.1f} {r['update_s']:>8.1f} {r['other_s']:>7.1f}")
    base, new = list(rows.values())[:2]
    print(f"speed-up: env_steps_per_s {new['env_steps_per_s'] / base['env_steps_per_s']:.2f}x, "
          f"tokens_per_s {new['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
