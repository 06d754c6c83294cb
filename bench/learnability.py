"""Do the learners learn? Reward probes a working RL learner must solve, run through its public `learn(env, budget)`.

Each learner (a registry name or `module:Class`) is built with its default config (plus any `--set`) and trained for
`--budget` env steps on each probe, for `--seeds` seeds. Probes (`--probes`):

- start:  reward 1 when the program contains `LogisticRegression` (a model family, on the program's first lines)
- middle: reward 1 when it contains `strategy="median"` (the numeric imputer's strategy, mid-program)
- avoid:  reward 1 when it does NOT contain `MinMaxScaler` (a common keyword, mid-program; leave it out)
- env:    the env's own reward (dev ROC AUC, −1 on failure, five-attempt fix-mode episodes) on titanic,
          credit_scoring and customer_churn, the bundled tasks whose first attempts run least often

Keyword probes have one attempt per episode; the program still runs in the sandbox (the probe wrapper replaces
only the reward, `etpo_env.probes.KeywordReward`). What is reported, per learner and probe (mean and 95% CI over
seeds, a t interval):

- the probe's rate before training and after B env steps, measured on `--samples` fresh samples of the policy it
  ends with (never the training samples; the same evaluation seeds at both points): the keyword rate for keyword
  probes; for the env probe, first-attempt validity (share of fresh episodes whose first program ran), episode
  return under the env's reward, the first attempt's dev score where it ran, and the normalized test score of the
  episode's final program;
- env steps until the training rollouts' mean reward first reached 0.8 (keyword probes; "—" if never);
- the diagnostics of the last update: KL to ρ per token, entropy per token (and its ratio to the first update's),
  and where the learning signal lands: mean |advantage| (PPO) or |Q(u,w) − E_π Q| (ETPO) on the first and the last
  tenth of each action's tokens;
- wall time per run.

    .venv/bin/python bench/learnability.py --quick                        # one seed, start probe, 128 steps
    .venv/bin/python bench/learnability.py --agents etpo,ppo --seeds 3     # every probe, budget 256 (env: 512)
    .venv/bin/python bench/learnability.py --agents etpo --probes start --set lam=0.0   # the paper's one-step backup
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Probe:
    name: str
    tasks: tuple[str, ...]
    keyword: str | None = None  # None: the env's own reward
    avoid: bool = False
    budget_scale: int = 1  # the env probe gets twice the keyword probes' budget (the issue's 512 against 256)

    def make_env(self, task: str, sandbox: str) -> Any:
        import gymnasium as gym

        import etpo_env  # noqa: F401  (registers DataSciCode-v0)
        from etpo_env.probes import KeywordReward

        if self.keyword is None:
            return gym.make("DataSciCode-v0", task=task, sandbox=sandbox)
        return KeywordReward(gym.make("DataSciCode-v0", task=task, sandbox=sandbox, max_attempts=1), self.keyword,
                             self.avoid)


PROBES = {
    "start": Probe("start", ("titanic",), keyword="LogisticRegression"),
    "middle": Probe("middle", ("titanic",), keyword='strategy="median"'),
    "avoid": Probe("avoid", ("titanic",), keyword="MinMaxScaler", avoid=True),
    "env": Probe("env", ("titanic", "credit_scoring", "customer_churn"), budget_scale=2),
}
EVAL_SEED = 10_000  # evaluation samples are seeded apart from training


def env_metrics(agent: Any, task: str, sandbox: Any, samples: int, seed: int) -> dict[str, float]:
    """Fresh five-attempt episodes of the current policy: first-attempt validity, episode return, first-attempt dev
    score where it ran, normalized test score of the final program."""
    import gymnasium as gym
    import numpy as np

    import tasks as tasks_pkg
    from agents.benchmark.episodes import TestScorer, isolated_rng, play_eval_episodes

    task_obj = tasks_pkg.get(task)
    envs = [gym.wrappers.RecordEpisodeStatistics(gym.make("DataSciCode-v0", task=task_obj, sandbox=sandbox))
            for _ in range(samples)]
    seeds = [seed + k for k in range(samples)]
    try:
        with isolated_rng(seed):
            episodes = play_eval_episodes(agent, envs, seeds, "fix")
        returns = [float(env.return_queue[-1]) for env in envs]
        scores = TestScorer(task_obj, sandbox, seed).score_all([e.program for e in episodes])
    finally:
        for env in envs:
            env.close()
    first_dev = [e.dev_score for e in episodes if e.first_success == 1 and e.dev_score is not None]
    normalized = [s["normalized"] for s in scores if s["normalized"] is not None]
    return {"validity": float(np.mean([e.first_success == 1 for e in episodes])),
            "return": float(np.mean(returns)),
            "dev_score": float(np.mean(first_dev)) if first_dev else float("nan"),
            "normalized": float(np.mean(normalized)) if normalized else float("nan")}


def diagnostics(stats: dict[str, float]) -> dict[str, float]:
    """The reviewer's diagnostics from one update's statistics, under one name per quantity for every learner."""
    nan = float("nan")
    return {"kl": stats.get("kl_to_reference", stats.get("kl", nan)), "entropy": stats.get("entropy", nan),
            "signal_first": stats.get("signal/advantage_first_tenth", nan),
            "signal_last": stats.get("signal/advantage_last_tenth", nan),
            "reward_mean": stats.get("reward_mean", nan), "env_steps": stats.get("env_steps", nan),
            # how far an update moved the policy from the one that sampled (PPO, GRPO; ETPO's clipped correction)
            "approx_kl": stats.get("approx_kl", nan), "clip_fraction": stats.get("clip_fraction", nan)}


def run_one(agent_spec: str, probe: Probe, task: str, seed: int, budget: int, samples: int, sandbox: str,
            overrides: list[str], model: str, on_update: Any = None) -> dict[str, Any]:
    """Train one learner on one probe and task for `budget` env steps; measure before and after."""
    from agents.benchmark.episodes import probe_rate
    from agents.registry import build_agent
    from sandbox import make_sandbox

    shared = make_sandbox(sandbox)
    env = probe.make_env(task, shared)
    curve: list[dict[str, float]] = []
    try:
        agent = build_agent(agent_spec, seed=seed, model=model, overrides=overrides)
        measure = ((lambda: {"rate": probe_rate(agent, env, samples, EVAL_SEED + seed)}) if probe.keyword else
                   (lambda: env_metrics(agent, task, shared, samples, EVAL_SEED + 1000 * seed)))
        before = measure()
        started = time.perf_counter()
        callbacks = [lambda stats: curve.append(diagnostics(stats))] + ([on_update] if on_update else [])
        agent.learn(env, budget, callbacks=callbacks)
        train_s = time.perf_counter() - started
        after = measure()
    finally:
        env.close()
        shared.close()
    reached = next((c["env_steps"] for c in curve if c["reward_mean"] >= 0.8), None) if probe.keyword else None
    return {"agent": agent_spec, "probe": probe.name, "task": task, "seed": seed, "budget": budget,
            "before": before, "after": after, "steps_to_0.8": reached, "train_s": train_s,
            "first_update": curve[0] if curve else {}, "last_update": curve[-1] if curve else {}, "curve": curve}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval (the interval is the mean alone for one value)."""
    import numpy as np
    from scipy import stats

    x = np.asarray([v for v in values if v == v], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float(x[0]), float(x[0])
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def fmt(values: list[float]) -> str:
    mean, lo, hi = mean_ci(values)
    return f"{mean:.2f}" if lo == hi else f"{mean:.2f} [{lo:.2f}, {hi:.2f}]"


def report(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (learner, probe, task, metric): before, after, paired gain, steps to 0.8, diagnostics, time."""
    lines = [f"{'agent':<10} {'probe':<7} {'task':<15} {'metric':<10} {'before':>18} {'after':>18} "
             f"{'gain (paired)':>20} {'to 0.8':>8} {'KL':>7} {'H':>6} {'H/H0':>5} {'sig 1st':>8} "
             f"{'sig last':>8} {'train s':>8}"]
    keys = sorted({(r["agent"], r["probe"], r["task"]) for r in rows}, key=lambda k: (k[0], list(PROBES).index(k[1]),
                                                                                       k[2]))
    for agent, probe, task in keys:
        group = [r for r in rows if (r["agent"], r["probe"], r["task"]) == (agent, probe, task)]
        steps = [r["steps_to_0.8"] for r in group]
        reached = "—" if PROBES[probe].keyword is None else (
            f"{sum(s for s in steps if s is not None) / max(1, sum(s is not None for s in steps)):.0f}"
            f"{'' if None not in steps else f' ({sum(s is None for s in steps)}✗)'}"
            if any(s is not None for s in steps) else "never")
        last = [r["last_update"] for r in group]
        ratio = [r["last_update"].get("entropy", float("nan")) / r["first_update"].get("entropy", float("nan"))
                 for r in group if r["first_update"].get("entropy")]
        diag = (f"{mean_ci([d.get('kl', float('nan')) for d in last])[0]:>7.3f} "
                f"{mean_ci([d.get('entropy', float('nan')) for d in last])[0]:>6.3f} {mean_ci(ratio)[0]:>5.2f} "
                f"{mean_ci([d.get('signal_first', float('nan')) for d in last])[0]:>8.3f} "
                f"{mean_ci([d.get('signal_last', float('nan')) for d in last])[0]:>8.3f} "
                f"{mean_ci([r['train_s'] for r in group])[0]:>8.0f}")
        for metric in group[0]["before"]:
            before = [r["before"][metric] for r in group]
            after = [r["after"][metric] for r in group]
            gain = [a - b for a, b in zip(after, before, strict=True)]
            lines.append(f"{agent:<10} {probe:<7} {task:<15} {metric:<10} {fmt(before):>18} {fmt(after):>18} "
                         f"{fmt(gain):>20} {reached:>8} {diag}")
            reached, diag = "", ""
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", default="etpo,ppo", help="registry names or module:Class, comma-separated")
    parser.add_argument("--probes", default=",".join(PROBES), help=f"comma list of {', '.join(PROBES)}")
    parser.add_argument("--tasks", default=None, help="comma list: run only these of the probes' tasks")
    parser.add_argument("--seeds", type=int, default=3, help="seeds first-seed .. first-seed + N − 1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=256, help="env steps per keyword probe (the env probe: 2×)")
    parser.add_argument("--samples", type=int, default=64, help="fresh samples (env probe: episodes) per measurement")
    parser.add_argument("--sandbox", default="auto")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a field of every learner's config (repeatable)")
    parser.add_argument("--quick", action="store_true", help="development: 1 seed, the start probe, budget 128, "
                                                              "32 samples (unless given explicitly)")
    parser.add_argument("--out", default=None, help="JSON lines of every run (appended)")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"seeds": 3, "probes": ",".join(PROBES), "budget": 256, "samples": 64}
        for key, value in {"seeds": 1, "probes": "start", "budget": 128, "samples": 32}.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    probes = [PROBES[name] for name in args.probes.split(",")]
    runs = [(agent, probe, task, seed) for agent in args.agents.split(",") for probe in probes
            for task in probe.tasks if args.tasks is None or task in args.tasks.split(",")
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    rows: list[dict[str, Any]] = []
    print(f"learnability: agents {args.agents}, probes {args.probes}, {args.seeds} seed(s), budget {args.budget}, "
          f"{args.samples} samples, {os.cpu_count()} CPUs{', set ' + ' '.join(args.overrides) if args.overrides else ''}",
          flush=True)
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
               TextColumn("env steps"), TimeElapsedColumn()]
    with Progress(*columns) as bar:
        total = bar.add_task("learnability", total=sum(args.budget * probe.budget_scale for _, probe, _, _ in runs))
        for agent, probe, task, seed in runs:
            bar.update(total, description=f"{agent} {probe.name} {task} s{seed}")
            row = run_one(agent, probe, task, seed, args.budget * probe.budget_scale, args.samples, args.sandbox,
                          args.overrides, args.model,
                          on_update=lambda stats: bar.advance(total, stats.get("env_steps_iteration", 0.0)))
            rows.append(row)
            bar.console.print(f"  {agent} {probe.name} {task} seed {seed}: {row['before']} → {row['after']}, "
                              f"0.8 at {row['steps_to_0.8']}, {row['train_s']:.0f} s")
            if args.out:
                with Path(args.out).open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print("\n".join(report(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
