"""The rollout collector and buffer, checked on a scripted text env (single and vectorised)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.policy import GenerationSettings
from agents.rollout import RolloutBuffer, RolloutCollector, Transition
from tests.fixtures_lm import ScriptedTextEnv

GEN = GenerationSettings(max_new_tokens=6, seed=0)


def test_collector_records_ids_logprobs_rewards_and_episode_links(tiny_policy):
    env = ScriptedTextEnv(length=3)
    collector = RolloutCollector(tiny_policy, env, GEN)
    buffer, stats = collector.collect(7)
    assert isinstance(buffer, RolloutBuffer) and len(buffer) == 7 and stats["env_steps"] == 7
    assert [t.episode_id for t in buffer] == [0, 0, 0, 1, 1, 1, 2]
    assert [t.t for t in buffer] == [0, 1, 2, 0, 1, 2, 0]
    assert [t.terminated for t in buffer] == [False, False, True, False, False, True, False]
    assert [t.next_index for t in buffer] == [1, 2, None, 4, 5, None, None]
    assert stats["episodes"] == 2 and stats["episode_return_mean"] == pytest.approx(
        np.mean([sum(len(a) for a in env.received[:3]), sum(len(a) for a in env.received[3:6])]))

    prompts_seen = [o for o in env.emitted if not o.endswith("step 3\ndef build_model(X, y):")]
    for transition, obs, action in zip(buffer, prompts_seen, env.received):
        assert transition.obs_ids.dtype == np.int32 and transition.action_ids.dtype == np.int32
        assert transition.obs_ids.tolist() == tiny_policy.encode(obs)  # ids of exactly the text the env emitted
        assert tiny_policy.decode(transition.action_ids.tolist()) == action  # the env got the sampled tokens
        assert transition.reward == float(len(action))
        assert transition.info["status"] in ("ok", "runtime_error")
    # log-probs: π at sampling time, ρ = reference; both equal a fresh scoring of the stored ids
    with torch.no_grad():
        pi = tiny_policy.sequence_logprobs([t.obs_ids.tolist() for t in buffer], [t.action_ids.tolist() for t in buffer])
        rho = tiny_policy.sequence_logprobs([t.obs_ids.tolist() for t in buffer],
                                            [t.action_ids.tolist() for t in buffer], adapter=None)
    for t, lp, lr in zip(buffer, pi, rho):
        np.testing.assert_allclose(t.logp, lp.numpy(), atol=1e-4)
        np.testing.assert_allclose(t.ref_logp, lr.numpy(), atol=1e-4)
    # the cut episode keeps the next observation to bootstrap from; finished ones do not need it
    assert buffer[6].next_obs_ids.tolist() == tiny_policy.encode(env.emitted[-1])
    assert buffer[2].next_obs_ids is None
    # only ids and per-token scalars: a few dozen bytes per token whatever the vocabulary
    assert buffer.bytes_per_token() < 200
    assert buffer.episodes() == [[0, 1, 2], [3, 4, 5], [6]]


def test_episodes_continue_across_collect_calls_and_truncation_keeps_next_obs(tiny_policy):
    env = ScriptedTextEnv(length=2, truncate=True)
    collector = RolloutCollector(tiny_policy, env, GEN)
    first, _ = collector.collect(1)
    second, _ = collector.collect(2)
    assert [t.episode_id for t in first] == [0] and [t.episode_id for t in second] == [0, 1]
    assert [t.t for t in second] == [1, 0]
    assert second[0].truncated and not second[0].terminated and second[0].next_index is None
    # the observation after truncation (what the env emitted after step 2 of episode 0)
    assert second[0].next_obs_ids.tolist() == tiny_policy.encode("Task A episode 0 step 2\ndef build_model(X, y):")
    assert collector.totals["env_steps"] == 3


def test_vector_env_next_step_autoreset_skips_ignored_actions(tiny_policy):
    envs = [ScriptedTextEnv(length=2, tag=tag) for tag in ("A", "B")]
    vec = gym.vector.SyncVectorEnv([lambda e=e: e for e in envs])
    collector = RolloutCollector(tiny_policy, vec, GEN)
    buffer, stats = collector.collect(6)
    # rounds: (A0,B0) (A1,B1 end) (autoreset: nothing recorded) (A0',B0') -> 6 transitions
    assert len(buffer) == 6 and stats["episodes"] == 2
    for env in envs:
        recorded = [t for t in buffer if tiny_policy.decode(t.obs_ids.tolist()).startswith(f"Task {env.tag}")]
        assert len(recorded) == 3
        # at autoreset gymnasium resets the sub-env instead of stepping it: every action the env got is recorded
        assert [tiny_policy.decode(t.action_ids.tolist()) for t in recorded] == env.received
    chains = buffer.episodes()
    assert sorted(len(c) for c in chains) == [1, 1, 2, 2]
    assert all(buffer[c[-1]].terminated for c in chains if len(c) == 2)


def test_buffer_minibatches_cover_everything_once():
    def tr(i):
        ids = np.arange(3, dtype=np.int32)
        return Transition(ids, ids, np.zeros(3, np.float32), np.zeros(3, np.float32), float(i), False, False, 0, i)

    buffer = RolloutBuffer(tr(i) for i in range(10))
    batches = list(buffer.minibatches(4, seed=0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(t.reward for b in batches for t in b) == list(map(float, range(10)))
    assert [t.reward for b in buffer.minibatches(4, shuffle=False) for t in b] == list(map(float, range(10)))
    assert buffer.token_count() == 30
    # 3 + 3 int32 ids + 2 float32 arrays of 3 = 48 bytes over 3 tokens
    assert buffer.bytes_per_token() == pytest.approx(16.0)
