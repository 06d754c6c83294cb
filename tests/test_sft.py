"""SFT: the loss on a fixed demonstration file goes down; self-improvement spends exactly its env-step budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.rollout import Transition
from agents.sft import SFTAgent, SFTConfig, load_demonstrations, merge_best, select_best
from tests.fixtures_lm import ScriptedTextEnv

DEMOS = [
    {"prompt": "The dataset has 200 rows and 5 features.\n\ndef build_model(X, y):",
     "action": "\n    from sklearn.naive_bayes import GaussianNB\n    return GaussianNB().fit(X, y)\n",
     "reward": 0.9, "info": {"status": "ok"}},
    {"prompt": "The dataset has 900 rows and 12 features.\n\ndef build_model(X, y):",
     "action": "\n    from sklearn.tree import DecisionTreeClassifier\n    return DecisionTreeClassifier().fit(X, y)\n",
     "reward": 0.8, "info": {"status": "ok"}},
    {"prompt": "The dataset has 50 rows and 3 features.\n\ndef build_model(X, y):",
     "action": "\n    return Broken(", "reward": -1.0, "info": {"status": "syntax_error"}},
]


@pytest.fixture()
def demo_file(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in DEMOS) + "\n")
    return path


def test_demonstration_file_filters_failed_and_low_reward_lines(demo_file, tmp_path):
    assert [c for _, c in load_demonstrations(demo_file)] == [DEMOS[0]["action"], DEMOS[1]["action"]]
    assert len(load_demonstrations(demo_file, min_reward=0.85)) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_demonstrations(bad)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_lowers_the_loss_on_a_fixed_demonstration_file(tiny_model_dir, demo_file, lora):
    agent = SFTAgent(model=tiny_model_dir, config=SFTConfig(recipe="demos", data=str(demo_file), lora=lora,
                                                           lr=3e-3 if lora else 1e-3, epochs=12, batch_size=2),
                     device="cpu")
    assert bool(agent.policy.adapter_names) == lora
    result = agent.learn(env=None, budget=0)
    assert result["demonstrations"] == 2 and result["sft_steps"] == 12
    # the test model is barely trained (NLL near log |V|); 12 steps must still lower it clearly
    assert result["nll_after"] < result["nll_before"] - 0.05, result


def test_select_best_and_merge_best_keep_the_highest_rewarded_valid_programs():
    def tr(reward, status, action):
        ids = np.array([1, 2], np.int32)
        return Transition(ids, np.array(action, np.int32), np.zeros(len(action), np.float32),
                          np.zeros(len(action), np.float32), reward, True, False, 0, 0, info={"status": status})

    buffer = [tr(0.5, "ok", [5]), tr(0.9, "ok", [6]), tr(2.0, "runtime_error", [7]), tr(0.7, "ok", [8])]
    kept = select_best(buffer, keep_fraction=0.5)
    assert [(r, a) for r, _, a in kept] == [(0.9, [6]), (0.7, [8])]
    assert select_best([buffer[2]], 0.5) == []
    best = merge_best(kept, [(0.95, [1], [6]), (0.1, [1], [9])], size=2)
    assert [(r, a) for r, _, a in best] == [(0.95, [6]), (0.7, [8])]


def test_self_improvement_counts_every_env_step_and_trains_on_the_best(tiny_model_dir, tmp_path):
    env = ScriptedTextEnv(length=3)
    agent = SFTAgent(model=tiny_model_dir, config=SFTConfig(rollout_steps=4, steps_per_round=2, batch_size=2,
                                                           keep_fraction=0.5, num_envs=1), device="cpu", max_new_tokens=8)
    before = [p.detach().clone() for p in agent.params]
    result = agent.learn(env, budget=10, out_dir=tmp_path / "run")
    assert len(env.received) == 10 and result["env_steps"] == 10  # rounds of 4, 4, 2
    assert result["updates"] == 3
    valid = [a for a in env.received if len(a) % 2 == 0]  # the scripted env's "ok" programs
    if valid:
        assert agent.best and max(r for r, _, _ in agent.best) == max(len(a) for a in valid)
        assert any(not np.allclose(b, p.detach()) for b, p in zip(before, agent.params))
    assert (tmp_path / "run" / "checkpoint" / "trainer.pt").exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
    resumed = SFTAgent.load(tmp_path / "run" / "checkpoint")
    assert resumed.counters == agent.counters and len(resumed.best) == len(agent.best)
    resumed.learn(env, budget=12)
    assert len(env.received) == 12  # the budget is the agent's lifetime count: 2 more steps


def test_the_learners_sample_alike_by_default():
    """ETPO, PPO and SFT start from the same model and sample it the same way, so a benchmark's step-0
    evaluations of the three agree seed by seed (SFT once kept 384 new tokens, and so a shorter prompt tail)."""
    from agents.etpo import ETPOConfig
    from agents.ppo import PPOConfig
    from agents.sft import SFTConfig

    assert SFTConfig().generation == ETPOConfig().generation == PPOConfig().generation
