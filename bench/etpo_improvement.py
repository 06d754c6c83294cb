"""Does RL improve the tiny code model? The benchmark protocol's step-0 and final evaluations of each learner.

For each learner (ETPO and PPO by default), on one bundled task and `--seeds` seeds: `--samples` fresh evaluation
episodes of the starting policy (step 0), training for `--budget` env steps with the learner's default config, and
the same number of fresh episodes again; each episode's final program is scored on the task's held-out test part
(`agents.benchmark`, the protocol of `etpo bench` with evaluation points 0 and budget). Episodes have one attempt by
default (`--max-attempts`: one program per sample). A failed program counts as a constant predictor (ROC AUC 0.5).
Evaluation episodes are the same for every learner (seeded by task, seed and point), so "step 0" measures the same
starting model once per learner: a check on sampling noise.

    .venv/bin/python bench/etpo_improvement.py                                    # breast_cancer, budget 48
    .venv/bin/python bench/etpo_improvement.py --task wine --budget 96 --agents etpo --model /path/to/model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="breast_cancer")
    parser.add_argument("--agents", default="etpo,ppo")
    parser.add_argument("--budget", type=int, default=48, help="env steps of training per learner and seed")
    parser.add_argument("--samples", type=int, default=32, help="evaluation episodes before and after training")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (intervals need at least 2)")
    parser.add_argument("--model", default="tiny", help="'tiny' (built offline, cached) or a model path")
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--max-attempts", type=int, default=1, help="attempts per episode (1: one program a sample)")
    parser.add_argument("--out", default=None, help="results folder (default: a temporary one)")
    args = parser.parse_args(argv)

    from agents.benchmark import format_ci, run_benchmark

    out = args.out or tempfile.mkdtemp(prefix="etpo-improvement-")
    print(f"task {args.task}, budget {args.budget} env steps, {args.samples} episodes before/after, "
          f"{args.seeds} seed(s), {os.cpu_count()} CPUs; results in {out}", flush=True)
    result = run_benchmark(args.agents.split(","), [args.task], args.seeds, args.budget, model=args.model,
                           sandbox=args.sandbox, out=out, eval_every=args.budget, eval_episodes=args.samples,
                           max_attempts=args.max_attempts)
    scale = result["summary"]["scale"]
    print(f"{'agent':<8} {'success 0':>9} {'success B':>9} {scale + ' at 0':>18} {'at B':>14} {'B − 0':>14} "
          f"{'train s':>8}")
    for row in result["summary"]["per_task"]:
        runs = [r for r in result["runs"] if r["agent"] == row["agent"]]
        step0_success = sum(r["curve"][0]["success_rate"] for r in runs) / len(runs)
        print(f"{row['agent']:<8} {step0_success:>9.2f} {row['success_rate']:>9.2f} "
              f"{format_ci(row['step0'], row['step0_ci']):>18} {format_ci(row['final'], row['final_ci']):>14} "
              f"{format_ci(row['gain'], row['gain_ci']):>14} "
              f"{sum(r['train_time_s'] for r in runs) / len(runs):>8.0f}")
    return 1 if any(r.get("error") for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
