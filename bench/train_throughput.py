"""ETPO training throughput: one env with one action generated per call (the path every learner had before) against
a pooled vector env whose whole rollout is generated in one batched call, side by side in one process.

    .venv/bin/python bench/train_throughput.py                  # tiny model, breast_cancer, 1 attempt, seed 0
    .venv/bin/python bench/train_throughput.py --budget 32 --num-envs 8 --pool-size 2

Both runs train the same ETPO config for the same env-step budget on the same task and seed; only the env (1 env,
or `num_envs` envs sharing `pool_size` sandboxes) differs. Printed per run: tokens/s of generation, env steps/s of
the whole run, and the phase breakdown (generation, sandbox, update, other) from the learner's own timers. The last
line is `speed-up: env_steps_per_s N.NNx, tokens_per_s N.NNx`.
"""

from __future__ import annotations

import argparse
import sys
import time

import gymnasium as gym


def run(model: str, task: str, budget: int, seed: int, num_envs: int, pool_size: int, sandbox: str) -> dict:
    import torch

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from agents.etpo import ETPOAgent

    torch.manual_seed(seed)
    env_options = dict(task=task, max_attempts=1, sandbox=sandbox)
    if num_envs == 1:
        env = gym.make("DataSciCode-v0", **env_options)
    else:
        env = gym.make_vec("DataSciCode-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                           pool_size=pool_size, **env_options)
    agent = ETPOAgent(model=model, seed=seed, rollout_steps=max(8, num_envs))
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
    return {"env_steps": summary["env_steps"], "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / phases["generation"] if phases["generation"] else 0.0,
            "env_steps_per_s": summary["env_steps"] / wall, **{f"{k}_s": v for k, v in phases.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (built if missing) or a model path")
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--budget", type=int, default=16, help="env steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=8, help="envs of the batched run")
    parser.add_argument("--pool-size", type=int, default=2, help="sandboxes shared by the batched run's envs")
    parser.add_argument("--sandbox", default="local")
    args = parser.parse_args(argv)

    rows = {}
    for name, num_envs in (("one env, unbatched", 1), (f"{args.num_envs} envs, batched", args.num_envs)):
        rows[name] = run(args.model, args.task, args.budget, args.seed, num_envs, args.pool_size, args.sandbox)
    header = f"{'run':<22} {'env steps':>9} {'wall s':>7} {'steps/s':>8} {'tokens/s':>9} " \
             f"{'gen s':>7} {'sandbox s':>9} {'update s':>8} {'other s':>7}"
    print(header)
    for name, r in rows.items():
        print(f"{name:<22} {r['env_steps']:>9.0f} {r['wall_s']:>7.1f} {r['env_steps_per_s']:>8.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['generation_s']:>7.1f} {r['sandbox_s']:>9.1f} {r['update_s']:>8.1f} "
              f"{r['other_s']:>7.1f}")
    base, new = rows.values()
    print(f"speed-up: env_steps_per_s {new['env_steps_per_s'] / base['env_steps_per_s']:.2f}x, "
          f"tokens_per_s {new['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
