"""Reward probes: wrappers of `DataSciCode-v0` whose reward is a fixed property of the action's text.

A learner that cannot raise the rate of a keyword it is paid for cannot learn anything harder; one that cannot
raise it when the keyword sits in the middle of a program, or cannot learn to avoid a keyword, does not assign credit
to the tokens that earned the reward. `bench/learnability.py` runs every learner on these probes.

    env = KeywordReward(gym.make("DataSciCode-v0", task="titanic", max_attempts=1), "LogisticRegression")
    env = KeywordReward(gym.make("DataSciCode-v0", task="titanic", max_attempts=1), "fillna", avoid=True)

The program still runs in the sandbox (the episode, its feedback and `info` are the env's own); only the reward is
replaced, and the env's reward is kept in `info["env_reward"]`. `spawn(inner)` wraps a sibling env the same way, so a
learner collects from several probe envs at once (`etpo_env.wrappers.spawn_siblings`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym


class KeywordReward(gym.Wrapper):
    """Reward 1 when the action's text contains `keyword` (with `avoid`: when it does not), else 0."""

    def __init__(self, env: gym.Env, keyword: str, avoid: bool = False):
        if not keyword:
            raise ValueError("a keyword probe needs a non-empty keyword")
        super().__init__(env)
        self.keyword, self.avoid = keyword, bool(avoid)

    def spawn(self, env: gym.Env) -> KeywordReward:
        """`env` under the same probe (a sibling for batched collection)."""
        return KeywordReward(env, self.keyword, self.avoid)

    def reward_of(self, action: str) -> float:
        """The probe's reward for an action's text (no env step needed: what evaluations of the probe use)."""
        return float((self.keyword in action) != self.avoid)

    def step(self, action: Any):
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "env_reward": float(env_reward)}
        return obs, self.reward_of(action), terminated, truncated, info
