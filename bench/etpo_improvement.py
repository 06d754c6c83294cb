"""Does RL improve the tiny code model? Mean normalized score of sampled programs before and after training.

For each learner (ETPO and PPO by default), on one bundled task: sample `--samples` programs from the starting
model and score each on the task's dev splits through `tasks.evaluate`; train for `--budget` env steps with
the learner's default config; sample and score again with the same seed. Both learners start from the same
cached tiny model, so the "before" column is the same model measured once per learner (a check on sampling
noise). A failed program counts as normalized score 0 in "mean norm (all)". Training episodes have one attempt
by default (see --max-attempts).

    .venv/bin/python bench/etpo_improvement.py                                    # breast_cancer, budget 48
    .venv/bin/python bench/etpo_improvement.py --task wine --budget 96 --agents etpo
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(policy, task: str, samples: int, seed: int, sandbox, max_new_tokens: int) -> dict:
    from agents.tiny import evaluate_samples

    (row,) = evaluate_samples(policy, [task], n_samples=samples, seed=seed, sandbox=sandbox,
                              max_new_tokens=max_new_tokens, max_attempts=1)  # one program per sample
    return row


def run_learner(name: str, args: argparse.Namespace, sandbox) -> dict:
    import gymnasium as gym

    import etpo_env  # noqa: F401  (registers DataSciCode-v0)
    from agents import resolve_agent_class

    agent = resolve_agent_class(name)(model="tiny", seed=args.seed)
    max_new = agent.config.generation.max_new_tokens
    before = measure(agent.policy, args.task, args.samples, args.eval_seed, sandbox, max_new)
    env = gym.make("DataSciCode-v0", task=args.task, sandbox=sandbox, max_attempts=args.max_attempts)
    started = time.perf_counter()
    try:
        summary = agent.learn(env, args.budget)
    finally:
        env.close()
    train_s = time.perf_counter() - started
    after = measure(agent.policy, args.task, args.samples, args.eval_seed, sandbox, max_new)
    return {"agent": name, "before": before, "after": after, "train_s": train_s,
            "updates": summary["updates"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--agents", default="etpo,ppo")
    parser.add_argument("--budget", type=int, default=48, help="env steps of training per learner")
    parser.add_argument("--samples", type=int, default=32, help="programs sampled before and after")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--eval-seed", type=int, default=1234, help="sampling seed of the before/after evaluation")
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--max-attempts", type=int, default=1,
                        help="attempts per training episode (1: every prompt is a first prompt, the only kind the "
                             "tiny model was trained on; feedback prompts are outside its training data)")
    args = parser.parse_args(argv)

    import torch

    from agents.tiny import ensure_tiny_model
    from sandbox import make_sandbox

    torch.manual_seed(args.seed)
    ensure_tiny_model()
    print(f"task {args.task}, budget {args.budget} env steps, {args.samples} samples before/after, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    header = (f"{'agent':<6} {'valid before':>12} {'valid after':>11} {'mean norm (all) before':>22} "
              f"{'after':>7} {'mean norm (valid) before':>24} {'after':>7} {'train s':>8}")
    rows = []
    with make_sandbox(args.sandbox) as sandbox:
        for name in args.agents.split(","):
            rows.append(run_learner(name.strip(), args, sandbox))
            print(f"  {name}: done in {rows[-1]['train_s']:.0f} s of training", flush=True)

    def fmt(value) -> str:
        return "   n/a" if value is None else f"{value:.3f}"

    print(header)
    for row in rows:
        b, a = row["before"], row["after"]
        print(f"{row['agent']:<6} {b['validity']:>12.2f} {a['validity']:>11.2f} {fmt(b['mean_normalized_all']):>22} "
              f"{fmt(a['mean_normalized_all']):>7} {fmt(b['mean_normalized_valid']):>24} "
              f"{fmt(a['mean_normalized_valid']):>7} {row['train_s']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
