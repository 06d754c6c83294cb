"""Learners learn: ETPO, PPO and GRPO, with their default configs, raise the rate of a rewarded keyword near the start of
the program (probe "start" of bench/learnability.py) far above the starting policy's, through `learn(env, budget)`.

The model is the "test-learn" tiny preset (the default tiny model's shape on first prompts only, no sandbox, about
two minutes to build): it writes programs of the demonstrations' shape, with the model family on the first lines,
so `LogisticRegression` appears in about one program in six before training. Rates are measured on fresh samples
of the final policy, not the training ones. With the paper's one-step ETPO targets (`lam=0`) or PPO's λ = 0.95 on
every token, the rate stays near its start (bench/learnability.py; README, "Learnability").
"""

from __future__ import annotations

import gymnasium as gym
import pytest

import etpo_env  # noqa: F401  (registers DataSciCode-v0)
from etpo_env.probes import KeywordReward

KEYWORD, SAMPLES = "LogisticRegression", 48
# Env steps of training per learner. PPO with its value head on the policy adapter (the old default) needed 512 on this
# model (0.15 -> 0.25 at 256 and 384 steps, 0.50 at 512); with the head on its own adapter (the default) it passes
# at 256, as ETPO and GRPO do (on the default tiny model: 0.19 -> 0.92 in 256 steps, 3 seeds, README "Learnability").
BUDGETS = {"etpo": 256, "ppo": 256, "grpo": 256}

pytestmark = [pytest.mark.slow, pytest.mark.sandbox]


@pytest.fixture(scope="module")
def learnable_model(tmp_path_factory):
    import torch

    from agents.tiny import build_tiny_model

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-learn")
    build_tiny_model(path, preset="test-learn", seed=0)
    return path


@pytest.mark.parametrize("agent_name", ["etpo", "ppo", "grpo"])
def test_learner_learns_a_keyword_at_the_start_of_the_program(agent_name, learnable_model, local_sandbox):
    from agents.benchmark.episodes import probe_rate
    from agents.registry import build_agent

    env = KeywordReward(gym.make("DataSciCode-v0", task="titanic", sandbox=local_sandbox, max_attempts=1), KEYWORD)
    try:
        agent = build_agent(agent_name, seed=0, model=str(learnable_model))
        before = probe_rate(agent, env, SAMPLES, seed=123)
        updates = []
        agent.learn(env, BUDGETS[agent_name], callbacks=updates.append)
        after = probe_rate(agent, env, SAMPLES, seed=123)
    finally:
        env.close()
    assert before < 0.35, f"the probe is too easy for this model: {before:.2f} before training"
    # measured on this model (seed 0, 48 samples; before the holdout protocol changed its prompts): etpo 0.12 -> 0.38,
    # ppo 0.12 -> 0.40 in 256 steps (now ppo 0.15 -> 0.50 in 512, see BUDGETS); the paper's one-step ETPO
    # targets and PPO's λ = 0.95 on every token stay at the start rate (on the default tiny model: 0.22 -> 0.19 and
    # 0.22 -> 0.25 in 256 steps, against 0.22 -> 0.88 and 0.22 -> 0.84 for these defaults)
    assert after >= 0.3 and after >= 2 * before and after - before >= 0.2, f"{agent_name}: {before:.2f} -> {after:.2f}"
    first, last = updates[-1]["signal/advantage_first_tenth"], updates[-1]["signal/advantage_last_tenth"]
    if agent_name == "etpo":  # the critic's |Q − E_π Q| lands where the decision is, at the start of the action
        assert first > last, (first, last)
    elif agent_name == "ppo":  # λ = 1 spreads the advantage over the action: the start gets as much as the end
        assert first >= 0.7 * last, (first, last)  # (main, λ = 0.95 per token: 0.06 / 0.17)
    else:  # GRPO: one advantage per action, the same on every token
        assert first == pytest.approx(last), (first, last)
