"""Reward probes (etpo_env.probes): the reward is a property of the action's text; the episode is the env's own."""

from __future__ import annotations

import pytest

from etpo_env.probes import KeywordReward
from etpo_env.wrappers import EnvStepBudget, spawn_siblings
from tests.fixtures_lm import ScriptedTextEnv


@pytest.mark.parametrize("avoid, rewards", [(False, [1.0, 0.0]), (True, [0.0, 1.0])])
def test_keyword_probe_pays_for_the_keyword_or_for_its_absence(avoid, rewards):
    env = KeywordReward(ScriptedTextEnv(length=2), "LogisticRegression", avoid=avoid)
    env.reset(seed=0)
    got = []
    for action in ("clf = LogisticRegression()", "clf = RandomForestClassifier()"):
        _, reward, _, _, info = env.step(action)
        got.append(reward)
        assert info["env_reward"] == float(len(action))  # the env's own reward is kept, not lost
        assert env.reward_of(action) == reward
    assert got == rewards


def test_keyword_probe_keeps_the_episode_of_the_env():
    env = KeywordReward(ScriptedTextEnv(length=2), "x")
    obs, _ = env.reset(seed=0)
    obs2, _, terminated, truncated, info = env.step("xx")
    assert obs2 != obs and not terminated and info["attempt"] == 1
    assert env.step("y")[2] is True  # the env decides when the episode ends


def test_siblings_of_a_probe_share_its_reward_and_the_budget():
    class Spawnable(ScriptedTextEnv):
        def spawn(self):
            return Spawnable(length=self.length)

    env = EnvStepBudget(KeywordReward(Spawnable(length=1), "Logistic", avoid=True), budget=3)
    siblings = spawn_siblings(env, 2)
    assert siblings is not None, "a probe must not turn batched collection off"
    rewards = []
    for sibling, action in zip(siblings, ("Logistic", "RandomForest"), strict=True):
        sibling.reset(seed=1)
        rewards.append(sibling.step(action)[1])
    assert rewards == [0.0, 1.0]  # each sibling is under the same probe (avoid "Logistic")
    assert env.steps == 2  # and counted on the shared ledger


def test_empty_keyword_is_refused():
    with pytest.raises(ValueError, match="keyword"):
        KeywordReward(ScriptedTextEnv(), "")
