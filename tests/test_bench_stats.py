"""The benchmark's arithmetic and bookkeeping, checked by hand: CI, aggregation, the budget wrapper, resume guard."""

import json
import math

import gymnasium as gym
import pytest

from agents import benchmark as bench
from etpo_env.wrappers import BudgetExceeded, EnvStepBudget


def test_mean_ci_matches_hand_computed_t_interval():
    # [1, 2, 3]: mean 2, sample sd 1, t_{0.975, 2} = 4.302652729911275 → half-width 4.3026527/√3.
    mean, half = bench.mean_ci([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    # Two values 0 and 1: sd √0.5, t_{0.975, 1} = 12.706204736174698 → 12.7062 · √0.5/√2 = 6.353102368.
    assert bench.mean_ci([0.0, 1.0])[1] == pytest.approx(12.706204736174698 * 0.5, rel=1e-9)


def test_mean_ci_with_one_or_no_value_reports_no_interval():
    mean, half = bench.mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)
    assert bench.format_ci(mean, half) == "0.700 ± n/a"
    assert all(math.isnan(v) for v in bench.mean_ci([]))
    assert bench.mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0)


def _run(agent, task, seed, final, step0=0.0, success=1.0, steps=4, wall=1.0, normalized=True):
    """A finished run as `run_metrics` leaves it: normalized scores, their raw twins (0.5 + x / 2)."""
    raw = {key: 0.5 + value / 2 for key, value in (("final", final), ("step0", step0))}
    return {"agent": agent, "task": task, "seed": seed,
            "final": final if normalized else None, "step0": step0 if normalized else None,
            "gain": final - step0 if normalized else None, "auc": (final + step0) / 2 if normalized else None,
            "search": 1.0 if normalized else None, "final_score": raw["final"], "step0_score": raw["step0"],
            "gain_score": raw["final"] - raw["step0"], "auc_score": (raw["final"] + raw["step0"]) / 2,
            "search_score": 1.0, "success_rate": success, "attempts_to_success": 1.0,
            "env_steps": steps, "wall_time_s": wall}


def test_summarize_per_task_and_overall_by_seed():
    runs = [
        _run("a", "t1", 0, 0.9), _run("a", "t1", 1, 0.7),
        _run("a", "t2", 0, 0.5, success=0.0), _run("a", "t2", 1, 0.9),
        _run("b", "t1", 0, 0.6),  # b has no t2 run: no complete seed, so no overall row
    ]
    summary = bench.summarize(runs, ["a", "b"], ["t1", "t2"], reps=200)
    assert summary["scale"] == "normalized"
    rows = {(r["task"], r["agent"]): r for r in summary["per_task"]}
    assert rows[("t1", "a")]["final"] == pytest.approx(0.8)
    assert rows[("t1", "a")]["final_ci"] == pytest.approx(12.706204736174698 * math.sqrt(0.02) / math.sqrt(2))
    assert rows[("t1", "a")]["gain"] == pytest.approx(0.8)  # paired: final − step 0 per seed, step 0 = 0
    assert rows[("t2", "a")]["success_rate"] == 0.5
    assert rows[("t1", "b")]["n"] == 1 and math.isnan(rows[("t1", "b")]["final_ci"])
    assert ("t2", "b") not in rows
    (overall,) = summary["overall"]
    # seed 0: mean(0.9, 0.5) = 0.7; seed 1: mean(0.7, 0.9) = 0.8 → overall 0.75 over n = 2 seeds.
    assert overall["agent"] == "a" and overall["n"] == 2
    assert overall["final"] == pytest.approx(0.75)
    assert overall["final_score"] == pytest.approx(0.875)
    assert overall["success_rate"] == 0.75
    assert overall["env_steps"] == 8 and overall["wall_time_s"] == 2.0
    assert summary["aggregate_tasks"] == ["t1"]  # b never ran t2


def test_without_reference_scores_everything_is_on_the_raw_scale():
    runs = [_run("a", "t1", 0, 0.9), _run("a", "t2", 0, 0.7, normalized=False),
            _run("a", "t1", 1, 0.7), _run("a", "t2", 1, 0.9, normalized=False)]
    summary = bench.summarize(runs, ["a"], ["t1", "t2"], reps=200)
    assert summary["scale"] == "score"  # never a mix of normalized and raw scores
    rows = {r["task"]: r for r in summary["per_task"]}
    assert rows["t2"]["final"] == pytest.approx(0.9)  # mean(0.85, 0.95)
    (overall,) = summary["overall"]
    assert overall["final"] == pytest.approx(0.9)  # seed 0: (0.95 + 0.85) / 2, seed 1: (0.85 + 0.95) / 2


def test_markdown_table_shape():
    text = bench.markdown_table(["x", "y"], [["1", "2"], ["3", "4"]])
    assert text.splitlines() == ["| x | y |", "| --- | --- |", "| 1 | 2 |", "| 3 | 4 |"]


class CountingEnv(gym.Env):
    """Episodes of 3 steps; reward = step number; a program 'p<k>' scores k/10 on dev, 'bad' fails."""

    observation_space = gym.spaces.Text(100)
    action_space = gym.spaces.Text(100)

    def __init__(self):
        self.t = 0
        self.calls = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return "prompt", {}

    def step(self, action):
        self.t += 1
        self.calls += 1
        ok = action != "bad"
        info = {"status": "ok" if ok else "runtime_error", "program": action,
                "score": int(action[1:]) / 10 if ok else None}
        return "feedback", float(self.t), self.t >= 3, False, info


def test_budget_wrapper_counts_truncates_and_refuses_overspending():
    inner = CountingEnv()
    env = EnvStepBudget(inner, budget=4)
    assert isinstance(env, gym.Wrapper)
    env.reset(seed=0)
    outcomes = [env.step(a) for a in ["p3", "bad", "p7"]]
    assert outcomes[2][2] is True  # the inner env terminated its episode
    env.reset()
    _, _, terminated, truncated, _ = env.step("p5")  # the last unit of budget: a time-limit truncation
    assert (terminated, truncated) == (False, True) and env.exhausted
    with pytest.raises(BudgetExceeded):
        env.step("p9")
    assert inner.calls == 4 and env.steps == 4 and env.episodes == 2
    assert env.rewards == [1.0, 2.0, 3.0, 1.0]
    assert env.statuses == ["ok", "runtime_error", "ok", "ok"]
    assert (env.best_program, env.best_dev_score) == ("p7", 0.7)
    assert (env.final_program, env.final_dev_score) == ("p5", 0.5)


def test_plain_agent_loop_spends_exactly_the_budget():
    from agents.base import ScriptedAgent, play

    inner = CountingEnv()
    env = EnvStepBudget(inner, budget=7)
    play(env, ScriptedAgent("p1"), seed=0, stop=lambda: env.exhausted)
    assert inner.calls == 7 and env.episodes == 3  # 3 + 3 + 1 steps


def test_resume_refuses_a_folder_from_other_settings(tmp_path):
    config = bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=4)
    (tmp_path / "config.json").write_text(json.dumps({"schema": bench.SCHEMA,
                                                      "comparable": config.comparable_fields()}))
    bench.check_resumable(tmp_path, config)  # same settings: fine
    other = bench.BenchConfig(agents=["random"], tasks=["u"], seeds=[5], budget=8)
    with pytest.raises(ValueError, match="budget: 4 -> 8"):
        bench.check_resumable(tmp_path, other)


def test_config_validation_and_labels():
    with pytest.raises(ValueError):
        bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=0)
    assert bench.agent_label("my_pkg.my_module:MyAgent") == "MyAgent"
    assert bench.run_file_name("etpo", "iris", 2) == "etpo__iris__seed2.json"
    from agents.options import split_pairs

    assert split_pairs(["lr=0.001", "top-p=0.9", "flag=true"]) == {"lr": "0.001", "top_p": "0.9", "flag": "true"}
    with pytest.raises(ValueError, match="key=value"):
        split_pairs(["lr"])
    config = bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=4)
    flat = config.to_dict()  # config.json keeps its flat layout: env fields beside the benchmark's own
    assert {"sandbox", "max_attempts", "mode", "reward", "prompt_style", "max_rows", "input_format", "eval_every",
            "eval_episodes", "eval_points", "agent_options"} <= set(flat) and "env" not in flat


def test_evaluation_points_are_zero_every_interval_and_the_budget():
    def points(budget, every=None):
        return bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=budget,
                                 eval_every=every).eval_points

    assert points(8, 4) == [0, 4, 8]
    assert points(10, 4) == [0, 4, 8, 10]  # the budget is always a point
    assert points(16) == [0, 4, 8, 12, 16]  # default interval: a quarter of the budget
    assert points(3, 5) == [0, 3]
    with pytest.raises(ValueError, match="eval_episodes"):
        bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=4, eval_episodes=0)


# ------------------------------------------------------------------------------------------------------------------
# Aggregates (rliable's estimators with a seeded stratified bootstrap), checked on examples small enough to do by hand
# ------------------------------------------------------------------------------------------------------------------
def test_iqm_and_mean_of_a_tiny_score_matrix():
    import numpy as np

    # 8 runs × 1 task, scores 0..7: the IQM drops the lowest and highest quarter (0, 1 and 6, 7) → mean(2..5) = 3.5.
    matrix = np.arange(8.0).reshape(8, 1)
    found = bench.aggregate_estimates({"a": matrix, "flat": np.full((4, 2), 0.25)}, reps=500, seed=0)
    assert found["a"]["iqm"][0] == pytest.approx(3.5) and found["a"]["mean"][0] == pytest.approx(3.5)
    low, high = found["a"]["mean"][1:]
    assert 0.0 <= low < 3.5 < high <= 7.0  # a resampled mean stays within the data
    assert found["flat"]["iqm"] == pytest.approx((0.25, 0.25, 0.25))  # no spread: a zero-width interval
    assert (found["flat"]["n_runs"], found["flat"]["n_tasks"]) == (4, 2)
    again = bench.aggregate_estimates({"a": matrix}, reps=500, seed=0)
    assert again["a"]["mean"] == found["a"]["mean"]  # the bootstrap is seeded: reproducible intervals


def test_stratified_bootstrap_resamples_runs_within_each_task():
    import numpy as np

    # Task 0 holds only 0s and 1s, task 1 only 10s and 11s: a stratified resample keeps every task's column.
    matrix = np.array([[0.0, 10.0], [1.0, 11.0]])
    samples = bench.stratified_bootstrap(matrix, lambda m: m, reps=50, rng=np.random.default_rng(1))
    assert samples.shape == (50, 2, 2)
    assert set(np.unique(samples[:, :, 0])) <= {0.0, 1.0} and set(np.unique(samples[:, :, 1])) <= {10.0, 11.0}


def test_probability_of_improvement_by_hand():
    import numpy as np

    # One task. x = (1, 2), y = (0, 3): pairs 1>0, 1<3, 2>0, 2<3 → 2 of 4 → 0.5. Ties count one half.
    matrices = {"etpo": np.array([[1.0], [2.0]]), "y": np.array([[0.0], [3.0]]), "tie": np.array([[1.0], [2.0]]),
                "worse": np.array([[-1.0], [0.0]])}
    found = bench.probability_of_improvement_estimates(matrices, "etpo", reps=300, seed=0)
    assert set(found) == {"y", "tie", "worse"}
    assert found["y"][0] == pytest.approx(0.5)
    assert found["tie"][0] == pytest.approx(0.5)  # 1 vs 1: ½, 1 vs 2: 0, 2 vs 1: 1, 2 vs 2: ½ → 2 of 4
    assert found["worse"] == pytest.approx((1.0, 1.0, 1.0))  # every etpo run beats every other run
    assert bench.probability_of_improvement_estimates(matrices, "absent") == {}


def test_the_bootstraps_probability_of_improvement_is_rliables():
    import numpy as np
    from rliable import metrics

    from agents.benchmark.statistics import pairwise_improvement

    rng = np.random.default_rng(0)
    for runs_x, runs_y, tasks in ((3, 3, 5), (2, 4, 1), (5, 3, 7)):
        x = rng.integers(0, 4, size=(runs_x, tasks)) / 4  # few distinct values: many ties, some equal columns
        y = rng.integers(0, 4, size=(runs_y, tasks)) / 4
        assert pairwise_improvement(x, y) == pytest.approx(metrics.probability_of_improvement(x, y), abs=1e-12)
        assert pairwise_improvement(x, x) == pytest.approx(0.5)
    # One task, x = (1, 2), y = (0, 3): 1 > 0, 1 < 3, 2 > 0, 2 < 3 → 2 of 4.
    assert pairwise_improvement(np.array([[1.0], [2.0]]), np.array([[0.0], [3.0]])) == 0.5


def test_task_shares_by_hand():
    """Three tasks, two seeds. etpo's mean finals per task (0.6, 0.2, 0.5) against y's (0.4, 0.3, 0.5): above on
    task 0, below on task 1, a tie (½) on task 2 → 1.5 / 3 = 0.5. etpo's mean gains (0.2, 0.0, −0.1): above 0 on
    one task, a tie on one → 0.5. Runs that agree within each task leave no room for the interval."""
    import numpy as np

    finals = {"etpo": np.array([[0.5, 0.2, 0.5], [0.7, 0.2, 0.5]]), "y": np.array([[0.4, 0.3, 0.5], [0.4, 0.3, 0.5]]),
              "worse": np.zeros((2, 3))}
    gains = {"etpo": np.array([[0.1, 0.0, -0.1], [0.3, 0.0, -0.1]])}
    found = bench.task_share_estimates(finals, gains, "etpo", reps=300, seed=0)
    assert set(found) == {"step 0", "y", "worse"}
    assert found["y"][0] == pytest.approx(0.5) and found["step 0"][0] == pytest.approx(0.5)
    assert found["worse"] == pytest.approx((1.0, 1.0, 1.0))
    assert found["step 0"][1:] == pytest.approx((0.5, 0.5))  # gains 0.1 or 0.3 on task 0: above 0 in every resample
    assert found["y"][1] <= 0.5 <= found["y"][2]
    assert bench.task_share_estimates(finals, gains, "absent") == {}


def test_summary_reports_the_task_shares_beside_the_aggregates():
    from agents.benchmark.config import BenchConfig
    from agents.benchmark.report import summary_markdown

    # etpo above its step 0 and above zero-shot on task t, below both on task u: ½ each
    runs = [_run("etpo", task, s, final, step0=0.3) for task, final in (("t", 0.5), ("u", 0.1)) for s in range(2)]
    runs += [_run("zero-shot", task, s, 0.3, step0=0.3) for task in ("t", "u") for s in range(2)]
    summary = bench.summarize(runs, ["etpo", "zero-shot"], ["t", "u"], reps=100)
    assert summary["task_shares"] == {"step 0": pytest.approx((0.5, 0.5, 0.5)),
                                      "zero-shot": pytest.approx((0.5, 0.5, 0.5))}
    config = BenchConfig(agents=["etpo", "zero-shot"], tasks=["t", "u"], seeds=[0, 1], budget=4)
    text = summary_markdown(config, summary, [])
    assert "Share of tasks where etpo's final" in text and "its step 0 0.50 [0.50, 0.50]; zero-shot 0.50" in text


def test_performance_profile_is_the_share_of_scores_above_tau():
    import numpy as np

    matrix = np.array([[0.1, 0.5], [0.9, 0.3]])  # 4 scores
    found = bench.performance_profile({"a": matrix}, np.array([0.0, 0.2, 0.4, 0.6, 1.0]), reps=100, seed=0)
    assert list(found["a"]["profile"]) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert np.all(found["a"]["low"] <= found["a"]["profile"]) and np.all(found["a"]["profile"] <= found["a"]["high"])


def test_score_matrices_use_the_seeds_every_agent_ran_on_every_task():
    runs = [_run("a", t, s, 0.1 * s) for t in ("t1", "t2") for s in (0, 1, 2)]
    runs += [_run("b", t, s, 0.2) for t in ("t1", "t2") for s in (0, 1)]  # b lacks seed 2
    matrices = bench.score_matrices(runs, ["a", "b"], ["t1", "t2"], "final")
    assert matrices["a"].shape == matrices["b"].shape == (2, 2)
    assert matrices["a"][:, 0].tolist() == pytest.approx([0.0, 0.1])


# ------------------------------------------------------------------------------------------------------------------
# One run's curve and evaluation seeds
# ------------------------------------------------------------------------------------------------------------------
def _point(point, normalized, success=1.0):
    return {"point": point, "score": 0.5 + normalized / 2, "normalized": normalized, "success_rate": success,
            "attempts_to_success": 1.0 if success else None}


MISSING = {"score": 0.5, "normalized": -0.2, "success_rate": 0.0, "attempts_to_success": None}
SEARCH = {"score": 0.95, "normalized": 0.9}


def test_run_metrics_final_gain_area_and_search():
    record = {"budget": 8, "eval_every": 4, "evaluations": [_point(0, 0.2), _point(4, 0.5), _point(8, 0.8)],
              "search_result": SEARCH}
    found = bench.run_metrics(record, MISSING)
    assert [p["point"] for p in found["curve"]] == [0, 4, 8] and all(p["measured"] for p in found["curve"])
    assert found["final"] == pytest.approx(0.8) and found["step0"] == pytest.approx(0.2)
    assert found["gain"] == pytest.approx(0.6) and found["auc"] == pytest.approx(0.5)
    assert found["final_score"] == pytest.approx(0.9) and found["search"] == 0.9


def test_run_metrics_repeat_a_fixed_agent_and_count_a_crash_as_nothing_ran():
    fixed = bench.run_metrics({"budget": 8, "eval_every": 4, "evaluations": [_point(0, 0.6)], "search_result": SEARCH},
                              MISSING)
    assert [p["normalized"] for p in fixed["curve"]] == [0.6, 0.6, 0.6] and fixed["gain"] == 0.0
    assert [p["measured"] for p in fixed["curve"]] == [True, False, False]
    crashed = bench.run_metrics({"budget": 8, "eval_every": 4, "evaluations": [_point(0, 0.6)], "search_result": SEARCH,
                                 "error": "RuntimeError: boom"}, MISSING)
    assert [p["normalized"] for p in crashed["curve"]] == [0.6, -0.2, -0.2] and crashed["success_rate"] == 0.0


def test_eval_seeds_depend_on_task_seed_and_episode_and_repeat_at_every_point():
    seeds = {bench.eval_seed(t, s, 0, k) for t in ("a", "b") for s in (0, 1) for k in (0, 1)}
    assert len(seeds) == 8  # all different
    assert all(0 <= s < 2**31 for s in seeds)
    # Common random numbers: every evaluation point replays the same episodes.
    assert {bench.eval_seed("a", 0, p, 1) for p in range(5)} == {bench.eval_seed("a", 0, 0, 1)}


def test_isolated_rng_seeds_a_block_and_restores_the_streams():
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    with bench.isolated_rng(123):
        inside = (random.random(), np.random.rand())
    assert (random.random(), np.random.rand()) == expected  # training's streams carry on as if nothing happened
    with bench.isolated_rng(123):
        assert (random.random(), np.random.rand()) == inside  # the same evaluation seed: the same draws


def test_isolated_rng_restores_torch_and_turns_gradients_off():
    import torch

    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    weight = torch.ones(2, requires_grad=True)
    with bench.isolated_rng(99):
        inside = torch.rand(3)
        assert not (weight * 2).requires_grad  # evaluation builds no graph: it cannot train anything
    assert torch.equal(torch.rand(3), expected)
    with bench.isolated_rng(99):
        assert torch.equal(torch.rand(3), inside)


def test_suites_expand_to_their_tasks():
    import tasks

    for suite in tasks.SUITES:  # bundled, hard, paper, all
        assert bench.resolve_tasks([suite]) == tasks.names(suite=suite)
    hard = tasks.names(suite="hard")
    assert bench.resolve_tasks(["iris", "hard", "iris"]) == ["iris", *[t for t in hard if t != "iris"]]


def test_demo_prints_each_learners_paired_gain_with_its_interval():
    from rich.console import Console

    from agents.benchmark.cli import print_gains

    runs = [_run("etpo", "t", s, final) for s, final in enumerate([0.3, 0.5, 0.4])]
    runs += [_run("zero-shot", "t", s, 0.2, step0=0.2) for s in range(3)]
    for run in runs:
        run["learner"] = run["agent"] == "etpo"
    summary = bench.summarize(runs, ["etpo", "zero-shot"], ["t"], reps=100)
    console = Console(record=True, width=100)
    print_gains({"runs": runs, "summary": summary}, console)
    text = console.export_text()
    # gains 0.3, 0.5, 0.4 (step 0 = 0): mean 0.4, sd 0.1, t_{0.975, 2} · 0.1 / √3 = 0.248.
    assert "final − step 0 per learner" in text and "paired over 3 seeds" in text
    assert "  etpo          0.400 ± 0.248" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "zero-shot" not in text  # not trained: nothing to gain


def test_the_demos_last_line_gives_every_agents_gain_with_its_interval():
    import re

    from agents.benchmark.cli import demo_line

    result = {"summary": {"overall": [
        {"agent": "etpo", "gain": 0.12, "gain_ci": 0.09, "validity_gain": 0.25, "validity_gain_ci": 0.1},
        {"agent": "zero-shot", "gain": 0.0, "gain_ci": 0.0, "validity_gain": 0.0, "validity_gain_ci": 0.0},
        {"agent": "ppo", "gain": -0.05, "gain_ci": float("nan"), "validity_gain": 0.0, "validity_gain_ci": 0.0},
    ]}}
    line = demo_line(result, "test_score")
    assert line == ("demo: etpo gain test_score +0.12 [0.03, 0.21]; zero-shot gain test_score +0.00 [0.00, 0.00]; "
                    "ppo gain test_score -0.05 [n/a, n/a]")
    parsed = re.findall(r"(\S+) gain (\S+) ([+-]\d+\.\d+) \[([-\d.]+), ([-\d.]+)\]", demo_line(result, "validity"))
    assert parsed[0] == ("etpo", "validity", "+0.25", "0.15", "0.35")


def test_the_summary_compares_the_agents_within_each_suite():
    from agents.benchmark.config import BenchConfig
    from agents.benchmark.report import summary_markdown, task_suites

    # Suite A: etpo 0.9 against zero-shot 0.5 on both tasks; suite B: 0.1 against 0.5. Pooled, P(etpo > zero-shot)
    # is ½; within A it is 1 and within B 0, and so are the shares of tasks where etpo's final is above.
    finals = {"a1": 0.9, "a2": 0.9, "b1": 0.1, "b2": 0.1}
    runs = [_run("etpo", task, s, final, step0=0.3) for task, final in finals.items() for s in range(2)]
    runs += [_run("zero-shot", task, s, 0.5, step0=0.5) for task in finals for s in range(2)]
    groups = {"A": ["a1", "a2"], "B": ["b1", "b2"], "empty": ["c"]}
    summary = bench.summarize(runs, ["etpo", "zero-shot"], list(finals), reps=100, groups=groups)
    assert summary["probability_of_improvement"]["zero-shot"][0] == pytest.approx(0.5)
    assert set(summary["by_group"]) == {"A", "B"}  # a group without runs has nothing to compare
    a, b = summary["by_group"]["A"], summary["by_group"]["B"]
    assert a["tasks"] == ["a1", "a2"] and b["tasks"] == ["b1", "b2"]
    assert a["final"]["etpo"]["mean"] == pytest.approx((0.9, 0.9, 0.9))
    assert a["gain"]["etpo"]["mean"] == pytest.approx((0.6, 0.6, 0.6))  # 0.9 − 0.3 on every run
    assert b["gain"]["etpo"]["mean"] == pytest.approx((-0.2, -0.2, -0.2))
    assert a["probability_of_improvement"]["zero-shot"] == pytest.approx((1.0, 1.0, 1.0))
    assert b["probability_of_improvement"]["zero-shot"] == pytest.approx((0.0, 0.0, 0.0))
    assert a["task_shares"] == {"step 0": pytest.approx((1.0, 1.0, 1.0)), "zero-shot": pytest.approx((1.0, 1.0, 1.0))}
    assert b["task_shares"] == {"step 0": pytest.approx((0.0, 0.0, 0.0)), "zero-shot": pytest.approx((0.0, 0.0, 0.0))}

    config = BenchConfig(agents=["etpo", "zero-shot"], tasks=list(finals), seeds=[0, 1], budget=4)
    text = summary_markdown(config, summary, [])
    assert "Suite `A` (2 task(s): a1, a2)" in text and "Suite `B` (2 task(s): b1, b2)" in text
    assert "| etpo | 0.90 [0.90, 0.90] | 0.90 [0.90, 0.90] | 0.60 [0.60, 0.60] | — | 1.00 [1.00, 1.00] |" in text
    assert "| zero-shot | 0.50 [0.50, 0.50] | 0.50 [0.50, 0.50] | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00] | " \
           "0.00 [0.00, 0.00] |" in text

    # One suite is the whole table: no per-suite section.
    alone = bench.summarize(runs, ["etpo", "zero-shot"], list(finals), reps=100, groups={"A": list(finals)})
    assert alone["by_group"] == {} and "Suite `" not in summary_markdown(config, alone, [])
    # The benchmark groups its tasks by the suite they are registered in.
    assert task_suites(["iris", "lending_default", "titanic", "my_csv"]) == {
        "bundled": ["iris", "titanic"], "hard": ["lending_default"], "other": ["my_csv"]}
