"""The rollout collector and buffer, checked on a scripted text env (single and vectorised)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from agents.lm import GenerationSettings
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


class SpawnableEnv(ScriptedTextEnv):
    """A scripted env that can be rebuilt as a sibling (tags B, C, ... in spawn order); info names a program."""

    spawned: list = []

    def spawn(self):
        sibling = type(self)(self.length, self.truncate, tag=chr(ord("A") + len(SpawnableEnv.spawned) + 1))
        SpawnableEnv.spawned.append(sibling)
        return sibling

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, {**info, "program": f"{self.tag}:{action}"}


def test_one_budget_wrapped_env_is_collected_with_siblings_in_batches_and_the_budget_is_exact(tiny_policy,
                                                                                               monkeypatch):
    from etpo_env.wrappers import EnvStepBudget

    SpawnableEnv.spawned = []
    base = SpawnableEnv(length=2)
    env = EnvStepBudget(base, budget=10)
    batches = []
    generate = tiny_policy.generate
    monkeypatch.setattr(tiny_policy, "generate", lambda prompts, *a, **k: batches.append(len(prompts)) or
                        generate(prompts, *a, **k))
    collector = RolloutCollector(tiny_policy, env, GEN, num_envs=4, seed=0)
    buffers = [collector.collect(n)[0] for n in (4, 4, 2)]
    envs = [base, *SpawnableEnv.spawned]
    assert [len(b) for b in buffers] == [4, 4, 2] and batches == [4, 4, 2]  # one batched call per round
    assert [e.tag for e in envs] == ["A", "B", "C", "D"] and [len(e.received) for e in envs] == [3, 3, 2, 2]
    # the wrapper handed over counted every sibling's step, in order, and refuses more
    assert env.steps == 10 and env.exhausted and len(env.statuses) == 10
    steps = [t for b in buffers for t in b]
    actions = [a for rnd in range(3) for e in envs if rnd < len(e.received) for a in e.received[rnd:rnd + 1]]
    assert [tiny_policy.decode(t.action_ids.tolist()) for t in steps] == actions
    assert env.rewards == [t.reward for t in steps]
    assert env.statuses == [t.info["status"] for t in steps]
    programs = [f"{tiny_policy.decode(t.obs_ids.tolist())[5]}:{a}" for t, a in zip(steps, actions)]  # "Task X ..."
    scored = [(t.info["score"], -i) for i, t in enumerate(steps) if t.info["status"] == "ok"]
    assert scored, "some sampled action has an even length"
    assert env.best_program == programs[-max(scored)[1]]  # the first of the best scores
    assert env.final_program == programs[max(i for i, t in enumerate(steps) if t.info["status"] == "ok")]
    # episodes: the last step truncates; only episodes that were played were begun
    assert steps[-1].truncated and not any(t.truncated for t in steps[:-1])
    assert env.episodes == 6 == len({t.episode_id for t in steps})
    assert [t.episode_id for t in steps] == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert [t.t for t in steps] == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert all(t.terminated for t in buffers[1]) and all(t.next_obs_ids is not None for t in buffers[0])


def test_a_collection_shorter_than_num_envs_bootstraps_each_cut_chain_from_its_own_env(tiny_policy):
    SpawnableEnv.spawned = []
    base = SpawnableEnv(length=2)
    collector = RolloutCollector(tiny_policy, base, GEN, num_envs=4)
    buffer, _ = collector.collect(2)  # envs C and D are made but never stepped (nor reset)
    assert len(buffer) == 2 and [e.episode for e in SpawnableEnv.spawned] == [0, -1, -1]
    for transition, env in zip(buffer, [base, SpawnableEnv.spawned[0]]):
        assert not transition.terminated and transition.next_obs_ids.tolist() == tiny_policy.encode(env.emitted[-1])


def test_an_env_whose_wrappers_cannot_be_replicated_is_an_error_that_says_what_to_do(tiny_policy):
    """Never a silent fall-back to one env: the message names the wrapper and the ways out."""
    from gymnasium.wrappers import NormalizeReward

    env = NormalizeReward(SpawnableEnv(length=2))
    with pytest.raises(ValueError, match="NormalizeReward.*spawn.*make_vec.*num_envs=1"):
        RolloutCollector(tiny_policy, env, GEN, num_envs=4)
    collector = RolloutCollector(tiny_policy, env, GEN, num_envs=1)  # one env needs no siblings
    buffer, _ = collector.collect(3)
    assert len(buffer) == 3 and collector.num_envs == 1 and len(env.unwrapped.received) == 3


class PrefetchingEnv(SpawnableEnv):
    """A spawnable scripted env that logs its `prefetch` and `step` calls into one shared list."""

    events: list = []

    def prefetch(self, action):
        PrefetchingEnv.events.append(("prefetch", self.tag, action))

    def step(self, action):
        PrefetchingEnv.events.append(("step", self.tag, action))
        return super().step(action)


def test_a_round_starts_every_program_before_stepping_the_envs_in_order(tiny_policy):
    from etpo_env.wrappers import EnvStepBudget

    SpawnableEnv.spawned, PrefetchingEnv.events = [], []
    env = EnvStepBudget(PrefetchingEnv(length=2), budget=8)
    buffer, _ = RolloutCollector(tiny_policy, env, GEN, num_envs=4, seed=0).collect(4)
    events = PrefetchingEnv.events
    assert [kind for kind, *_ in events] == ["prefetch"] * 4 + ["step"] * 4
    assert [tag for _, tag, _ in events] == list("ABCD") * 2  # steps (and so every record) in index order
    assert [a for *_, a in events[:4]] == [a for *_, a in events[4:]]  # each env prefetched the action it steps
    assert env.steps == 4 and [t.info["status"] for t in buffer] == env.statuses


def test_overlapped_collection_generates_one_half_while_the_other_halfs_programs_run(tiny_policy, monkeypatch):
    """With `overlap`, halves A B | C D take turns: C D's actions are generated after A B's programs started and
    before A B are stepped, and so on; steps stay in a fixed order, the budget is exact, every prefetched program
    is the one stepped, and no half starts more envs than steps are left."""
    from etpo_env.wrappers import EnvStepBudget

    SpawnableEnv.spawned, PrefetchingEnv.events = [], []
    generate = tiny_policy.generate

    def logged(prompts, *args, **kwargs):
        PrefetchingEnv.events.append(("generate", len(prompts), None))
        return generate(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny_policy, "generate", logged)
    env = EnvStepBudget(PrefetchingEnv(length=2), budget=7)
    collector = RolloutCollector(tiny_policy, env, GEN, num_envs=4, seed=0, overlap=True)
    buffer, stats = collector.collect(7)
    order = [f"{kind[0]}{tag}" for kind, tag, _ in PrefetchingEnv.events]
    assert order == ["g2", "pA", "pB", "g2", "pC", "pD", "sA", "sB", "g2", "pA", "pB", "sC", "sD", "g1", "pC",
                     "sA", "sB", "sC"]
    starts = [e for e in PrefetchingEnv.events if e[0] == "prefetch"]
    steps = [e for e in PrefetchingEnv.events if e[0] == "step"]
    assert [e[1:] for e in starts] == [e[1:] for e in steps]  # each env stepped the program it started
    assert len(buffer) == 7 and env.steps == 7 and [t.info["status"] for t in buffer] == env.statuses
    assert [t.episode_id for t in buffer] == [0, 1, 2, 3, 0, 1, 2]  # A B C D, then A B C's second steps
    assert [t.t for t in buffer] == [0, 0, 0, 0, 1, 1, 1] and all(t.terminated for t in buffer[4:])
    assert stats["generated_tokens"] == sum(t.n_tokens for t in buffer)
    # D's first episode is cut by the end of the collection: it bootstraps from D's own next observation
    assert not buffer[3].terminated and buffer[3].next_obs_ids is not None


def test_overlap_follows_the_runtime_setting(tiny_policy):
    from agents.lm import RuntimeSettings, overlaps_generation

    assert overlaps_generation(RuntimeSettings(), torch.device("cuda")) is True
    assert overlaps_generation(RuntimeSettings(), torch.device("cpu")) is False
    assert overlaps_generation(RuntimeSettings(overlap_generation="on"), torch.device("cpu")) is True
    assert overlaps_generation(RuntimeSettings(overlap_generation="off"), torch.device("cuda")) is False
    with pytest.raises(ValueError, match="overlap_generation"):
        RuntimeSettings(overlap_generation="yes")


def test_fill_per_token_splits_padded_and_flat_arrays_by_action_length():
    from agents.rollout import Transition, fill_per_token

    def bare(n):
        return Transition(np.zeros(1, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32),
                          np.zeros(n, np.float32), 0.0, True, False, 0, 0)

    batch = [bare(2), bare(3)]
    padded = np.array([[1.0, 2.0, 9.0], [3.0, 4.0, 5.0]])
    flat = np.array([6.0, 7.0, 8.0, 9.0, 10.0])
    fill_per_token(batch, values=padded, ref_logp=flat)
    assert [t.values.tolist() for t in batch] == [[1.0, 2.0], [3.0, 4.0, 5.0]]
    assert [t.ref_logp.tolist() for t in batch] == [[6.0, 7.0], [8.0, 9.0, 10.0]]
    assert all(t.values.dtype == np.float32 and not np.shares_memory(t.values, padded) for t in batch)
    with pytest.raises(ValueError, match="not a per-token field"):
        fill_per_token(batch, reward=flat)
