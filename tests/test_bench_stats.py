"""The benchmark's arithmetic and bookkeeping, checked by hand: CI, aggregation, the budget wrapper, resume guard."""

import json
import math

import gymnasium as gym
import pytest

from agents import bench
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


def _run(agent, task, seed, score, success=True, steps=4, wall=1.0):
    return {"agent": agent, "task": task, "seed": seed, "score": score, "normalized": (score - 0.5) / 0.5,
            "success": success, "env_steps": steps, "wall_time_s": wall}


def test_summarize_per_task_and_overall_by_seed():
    runs = [
        _run("a", "t1", 0, 0.9), _run("a", "t1", 1, 0.7),
        _run("a", "t2", 0, 0.5, success=False), _run("a", "t2", 1, 0.9),
        _run("b", "t1", 0, 0.6),  # b has no t2 run: no complete seed, so no overall row
    ]
    summary = bench.summarize(runs, ["a", "b"], ["t1", "t2"])
    rows = {(r["task"], r["agent"]): r for r in summary["per_task"]}
    assert rows[("t1", "a")]["score"] == pytest.approx(0.8)
    assert rows[("t1", "a")]["score_ci"] == pytest.approx(12.706204736174698 * math.sqrt(0.02) / math.sqrt(2))
    assert rows[("t2", "a")]["success_rate"] == 0.5
    assert rows[("t1", "b")]["n"] == 1 and math.isnan(rows[("t1", "b")]["score_ci"])
    assert ("t2", "b") not in rows
    (overall,) = summary["overall"]
    # seed 0: mean(0.9, 0.5) = 0.7; seed 1: mean(0.7, 0.9) = 0.8 → overall 0.75 over n = 2 seeds.
    assert overall["agent"] == "a" and overall["n"] == 2
    assert overall["score"] == pytest.approx(0.75)
    assert overall["normalized"] == pytest.approx(0.5)
    assert overall["success_rate"] == 0.75
    assert overall["env_steps"] == 8 and overall["wall_time_s"] == 2.0


def test_tasks_without_reference_scores_have_no_normalized_value():
    runs = [_run("a", "t1", 0, 0.9), _run("a", "t2", 0, 0.7), _run("a", "t1", 1, 0.7), _run("a", "t2", 1, 0.9)]
    for run in runs:
        if run["task"] == "t2":
            run["normalized"] = None
    summary = bench.summarize(runs, ["a"], ["t1", "t2"])
    rows = {r["task"]: r for r in summary["per_task"]}
    assert math.isnan(rows["t2"]["normalized"]) and bench.format_ci(rows["t2"]["normalized"], 0.1) == "n/a"
    (overall,) = summary["overall"]
    assert overall["score"] == pytest.approx(0.8)  # raw metric: both tasks
    assert overall["normalized"] == pytest.approx(0.6)  # normalized: t1 only, (0.8 + 0.4) / 2


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
    from agents.base import ScriptedAgent

    inner = CountingEnv()
    env = EnvStepBudget(inner, budget=7)
    bench.act_for_budget(ScriptedAgent("p1"), env, seed=0)
    assert inner.calls == 7 and env.episodes == 3  # 3 + 3 + 1 steps


def test_resume_refuses_a_folder_from_other_settings(tmp_path):
    config = bench.BenchConfig(agents=["scripted"], tasks=["t"], seeds=[0], budget=4)
    (tmp_path / "config.json").write_text(json.dumps({"comparable": config.comparable_fields()}))
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
    assert {"sandbox", "max_attempts", "mode", "reward", "prompt_style", "max_rows", "input_format", "select",
            "agent_options"} <= set(flat) and "env" not in flat
