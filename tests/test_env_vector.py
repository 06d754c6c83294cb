"""Pooled mode: SandboxPool bounds and shares sandboxes; ThreadedVectorEnv steps envs concurrently.

The concurrency checks use a sandbox double that sleeps, so overlap is visible in wall time; the real sandbox
path of the pooled vector env is covered in test_env.py.
"""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode

import tasks
from etpo_env.env import DataSciCodeEnv
from etpo_env.vector import ThreadedVectorEnv, make_pooled_vec_env
from sandbox import RunResult, Status
from sandbox.pool import SandboxPool

SLEEP_S = 1.0


class SleepySandbox:
    """Test double: every run takes `delay` seconds and fails; records how many runs overlap."""

    isolation = "test-double"
    active = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, delay: float = SLEEP_S):
        self.delay = delay
        self.closed = 0

    def run(self, job):
        with SleepySandbox.lock:
            SleepySandbox.active += 1
            SleepySandbox.peak = max(SleepySandbox.peak, SleepySandbox.active)
        time.sleep(self.delay)
        with SleepySandbox.lock:
            SleepySandbox.active -= 1
        return RunResult(Status.RUNTIME_ERROR, message="ValueError: slept", error_type="ValueError",
                         isolation=self.isolation)

    def close(self):
        self.closed += 1


@pytest.fixture(autouse=True)
def _reset_counters():
    SleepySandbox.active = SleepySandbox.peak = 0


@pytest.fixture(scope="module")
def task():
    return tasks.get("breast_cancer")


def _timed_step(envs, actions):
    started = time.perf_counter()
    result = envs.step(actions)
    return time.perf_counter() - started, result


def test_pool_bounds_concurrency_and_creates_lazily():
    made = []
    pool = SandboxPool(size=2, factory=lambda: made.append(SleepySandbox()) or made[-1])
    assert pool.started == 0  # nothing before the first run
    threads = [threading.Thread(target=pool.run, args=(None,)) for _ in range(5)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert SleepySandbox.peak == 2 and len(made) == 2 == pool.started
    assert elapsed >= 3 * SLEEP_S * 0.95  # 5 runs through 2 slots take 3 rounds
    assert pool.isolation == "test-double"
    pool.close()
    pool.close()
    assert [sandbox.closed for sandbox in made] == [1, 1]
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(None)


def test_threaded_vector_env_steps_envs_concurrently(task):
    pool = SandboxPool(size=4, factory=SleepySandbox)
    envs = ThreadedVectorEnv([lambda: DataSciCodeEnv(task=task, sandbox=pool) for _ in range(4)], owned=[pool])
    envs.reset(seed=0)
    elapsed, (obs, rewards, terminated, truncated, infos) = _timed_step(envs, ("return 1",) * 4)
    assert SleepySandbox.peak == 4 and elapsed < 2.5 * SLEEP_S  # sequential stepping takes 4 * SLEEP_S
    assert rewards.tolist() == [-1.0] * 4 and not terminated.any() and not truncated.any()
    assert list(infos["status"]) == ["runtime_error"] * 4 and all("slept" in o for o in obs)
    envs.close()
    assert pool.started == 0  # the vector env closed the pool it owns


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_threaded_vector_env_autoreset_matches_sync_vector_env(task, mode):
    """Same observations, rewards, flags and info as Gymnasium's SyncVectorEnv under each autoreset mode."""
    actions = [("a", "b"), ("c", "d"), ("e", "f")]

    def run(vector_cls):
        fns = [lambda i=i: DataSciCodeEnv(task=task, sandbox=SleepySandbox(delay=0.0), max_attempts=1 + i)
               for i in range(2)]
        envs = vector_cls(fns, autoreset_mode=mode)
        out = [envs.reset(seed=0)]
        out += [envs.step(a) for a in actions]
        envs.close()
        return out

    threaded, sync = run(ThreadedVectorEnv), run(gym.vector.SyncVectorEnv)
    assert data_equivalence(threaded, sync, exact=True)
    assert sync[1][2].tolist() == [True, False]  # env 0 (one attempt) ended at its first step, so autoreset is exercised


def test_make_pooled_vec_env_bounds_sandboxes(task, monkeypatch):
    made = []

    def fake_factory(backend, limits):
        assert (backend, limits) == ("local", None)
        return lambda: made.append(SleepySandbox()) or made[-1]

    monkeypatch.setattr("sandbox.pool._sandbox_factory", fake_factory)
    envs = make_pooled_vec_env(num_envs=4, pool_size=2, sandbox="local", task=task)
    envs.reset(seed=0)
    elapsed, _ = _timed_step(envs, ("return 1",) * 4)
    assert len(made) == 2 and SleepySandbox.peak == 2
    assert 2 * SLEEP_S * 0.95 <= elapsed < 3.5 * SLEEP_S  # two rounds of two, not four in a row
    envs.close()
    assert [sandbox.closed for sandbox in made] == [1, 1]


def test_make_pooled_vec_env_takes_an_env_config(task, monkeypatch):
    from etpo_env.config import EnvConfig

    seen = []
    original = make_pooled_vec_env.__globals__["SandboxPool"]
    monkeypatch.setattr("etpo_env.vector.SandboxPool",
                        lambda size, backend, limits: seen.append(backend) or original(size=size, factory=SleepySandbox))
    envs = make_pooled_vec_env(num_envs=2, config=EnvConfig(task=task, sandbox="local", max_attempts=2))
    assert seen == ["local"] and [e.unwrapped.max_attempts for e in envs.envs] == [2, 2]
    envs.close()


def test_pooled_kwargs_errors(task):
    with pytest.raises(ValueError, match="limits"):
        make_pooled_vec_env(num_envs=2, sandbox=SleepySandbox(), limits=object(), task=task)
    with pytest.raises(ValueError, match="size"):
        SandboxPool(size=0)


# ----------------------------------------------------------------------------------------------------------------
# Siblings of one env: a shared budget ledger, a shared recorder, the wrapper chain rebuilt
# ----------------------------------------------------------------------------------------------------------------
class ProgramEnv(gym.Env):
    """Two-step episodes; the action "pN" is an ok program scoring N/10, anything else a runtime error."""

    metadata = {"render_modes": []}
    observation_space = gym.spaces.Text(max_length=100)
    action_space = gym.spaces.Text(max_length=100)

    def __init__(self, calls: list | None = None):
        self.calls = [] if calls is None else calls  # shared by spawned envs: every step any of them took

    def spawn(self):
        return ProgramEnv(self.calls)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return "prompt", {}

    def step(self, action):
        self.calls.append(action)
        self.t += 1
        ok = action.startswith("p")
        info = {"status": "ok" if ok else "runtime_error", "score": int(action[1:]) / 10 if ok else None,
                "program": action}
        return "feedback", float(ok), self.t >= 2, False, info


def test_spawned_budgets_share_one_exact_ledger():
    from etpo_env.wrappers import BudgetExceeded, EnvStepBudget

    first = EnvStepBudget(ProgramEnv(), budget=5)
    second = first.spawn(first.env.spawn())
    for env in (first, second):
        env.reset(seed=0)
    outcomes = [env.step(action) for env, action in zip((first, second, first, second), ("p3", "bad", "p7", "p9"))]
    first.reset()
    outcomes.append(first.step("p5"))
    assert [o[2] for o in outcomes] == [False, False, True, True, False]
    assert [o[3] for o in outcomes] == [False, False, False, False, True]  # the last unit truncates, whoever spends it
    for env in (first, second):
        with pytest.raises(BudgetExceeded):
            env.step("p1")
        assert env.exhausted and env.remaining == 0
    assert first.env.calls == ["p3", "bad", "p7", "p9", "p5"]
    for env in (first, second):  # both read the one ledger
        assert env.steps == 5 and env.episodes == 3
        assert env.statuses == ["ok", "runtime_error", "ok", "ok", "ok"]
        assert env.rewards == [1.0, 0.0, 1.0, 1.0, 1.0] and env.dev_scores == [0.3, None, 0.7, 0.9, 0.5]
        assert (env.best_program, env.best_dev_score) == ("p9", 0.9)
        assert (env.final_program, env.final_dev_score) == ("p5", 0.5)


def test_concurrent_siblings_never_overshoot_the_budget():
    from etpo_env.wrappers import BudgetExceeded, EnvStepBudget

    class SlowEnv(ProgramEnv):
        def step(self, action):
            time.sleep(0.01)  # many steps in flight at once
            self.t = 0  # never ends its episode
            return super().step(action)

    first = EnvStepBudget(SlowEnv(), budget=7)
    envs = [first] + [first.spawn(SlowEnv(first.env.calls)) for _ in range(3)]

    def spend(env):
        env.reset()
        try:
            while True:
                env.step("p1")
        except BudgetExceeded:
            pass

    threads = [threading.Thread(target=spend, args=(env,)) for env in envs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(first.env.calls) == 7 and first.steps == 7 and len(first.statuses) == 7


def test_spawn_siblings_rebuilds_the_wrapper_chain_and_shares_stateful_wrappers():
    from gymnasium.wrappers import NormalizeReward, OrderEnforcing, PassiveEnvChecker, TimeLimit

    from etpo_env.wrappers import EnvStepBudget, spawn_siblings

    env = EnvStepBudget(TimeLimit(OrderEnforcing(PassiveEnvChecker(ProgramEnv())), max_episode_steps=3), budget=9)
    siblings = spawn_siblings(env, 2)
    assert len(siblings) == 2
    for sibling in siblings:
        chain = [sibling]
        while isinstance(chain[-1], gym.Wrapper):
            chain.append(chain[-1].env)
        assert [type(layer) for layer in chain] == [EnvStepBudget, TimeLimit, OrderEnforcing, ProgramEnv]
        assert sibling.ledger is env.ledger and chain[1]._max_episode_steps == 3
        assert chain[-1] is not env.unwrapped and chain[-1].calls is env.unwrapped.calls
    siblings[0].reset()
    siblings[0].step("p4")
    assert env.steps == 1 and env.best_program == "p4"  # the given env's budget saw the sibling's step
    # running statistics belong to one stream of steps; a base env that cannot be rebuilt: an error saying why
    with pytest.raises(ValueError, match="wrapper NormalizeReward"):
        spawn_siblings(NormalizeReward(ProgramEnv()), 2)
    with pytest.raises(ValueError, match="siblings of CartPoleEnv"):
        spawn_siblings(EnvStepBudget(gym.make("CartPole-v1"), budget=3), 1)


def test_spawn_siblings_of_a_datascicode_env_share_its_sandbox(task, monkeypatch):
    import sandbox as sandbox_pkg
    from etpo_env.wrappers import EnvStepBudget, spawn_siblings

    made = []
    monkeypatch.setattr(sandbox_pkg, "make_sandbox", lambda *a, **k: made.append(SleepySandbox(0.0)) or made[-1])
    env = EnvStepBudget(gym.make("DataSciCode-v0", task=task, sandbox="local", max_attempts=2), budget=4)
    env.reset(seed=0)  # the env starts its own sandbox
    siblings = spawn_siblings(env, 2)
    for sibling in siblings:
        sibling.reset()
        _, _, _, _, info = sibling.step("def build_model(X, y):\n    return None")
        assert info["status"] == "runtime_error"
        assert sibling.unwrapped.sandbox is env.unwrapped.sandbox and sibling.unwrapped.config.max_attempts == 2
        sibling.close()
    assert len(made) == 1 and made[0].closed == 0  # siblings use the env's sandbox and leave it open
    assert env.steps == 2 and env.episodes == 3
    env.close()
    assert made[0].closed == 1


def test_spawned_recorders_write_one_file_with_distinct_episode_numbers(tmp_path):
    import json

    from etpo_env.wrappers import EpisodeRecorder

    path = tmp_path / "episodes.jsonl"
    first = EpisodeRecorder(ProgramEnv(), path)
    second = first.spawn(ProgramEnv())
    for env, action in ((first, "p1"), (second, "p2"), (first, "p3")):
        env.reset()
        env.step(action)
    second.close()  # a sibling leaves the file to the recorder it was spawned from
    first.reset()
    first.step("p4")
    first.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["episode"], line["action"]) for line in lines] == [(0, "p1"), (1, "p2"), (2, "p3"), (3, "p4")]


# ----------------------------------------------------------------------------------------------------------------
# SiblingVectorEnv: one wrapped env and its siblings as one vector env (the learners' one vectorisation path)
# ----------------------------------------------------------------------------------------------------------------
class PrefetchingProgramEnv(ProgramEnv):
    """`ProgramEnv` that logs prefetch and step calls (shared by its siblings)."""

    def __init__(self, calls: list | None = None, events: list | None = None):
        super().__init__(calls)
        self.events = [] if events is None else events
        self.closed = False

    def spawn(self):
        return PrefetchingProgramEnv(self.calls, self.events)

    def prefetch(self, action):
        self.events.append(("prefetch", action))

    def step(self, action):
        self.events.append(("step", action))
        return super().step(action)

    def close(self):
        self.closed = True


def test_vectorize_makes_siblings_under_the_wrappers_when_sub_env_0_is_first_reset():
    from etpo_env.vector import SiblingVectorEnv, vectorize
    from etpo_env.wrappers import EnvStepBudget

    env = EnvStepBudget(PrefetchingProgramEnv(), budget=10)
    vec = vectorize(env, 3)
    assert isinstance(vec, SiblingVectorEnv) and vec.num_envs == 3 and vec.envs == [env]  # no sibling before a reset
    assert vec.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    with pytest.raises(ValueError, match="sub-env 0 first"):
        vec.reset(options={"reset_mask": np.array([False, True, False])})
    obs, _ = vec.reset(seed=5, options={"reset_mask": np.array([True, False, False])})
    assert len(vec.envs) == 3 and all(isinstance(e, EnvStepBudget) and e.ledger is env.ledger for e in vec.envs[1:])
    assert obs == ("prompt", None, None)  # only sub-env 0 was reset
    assert vectorize(vec, 7) is vec  # a vector env is used as it is


def test_none_actions_leave_sub_envs_out_and_infos_keep_their_values():
    from etpo_env.vector import vectorize

    vec = vectorize(PrefetchingProgramEnv(), 3)
    vec.reset(seed=0)
    obs, rewards, terminated, truncated, infos = vec.step(("p4", None, "bad"))
    assert obs == ("feedback", "prompt", "feedback") and rewards.tolist() == [1.0, 0.0, 0.0]
    assert infos["stepped"].tolist() == [True, False, True] and not terminated.any() and not truncated.any()
    assert infos["score"][0] == 0.4 and infos["score"][2] is None  # a None score stays None (not NaN)
    assert infos["_score"].tolist() == [True, False, True]
    assert vec.envs[0].unwrapped.calls == ["p4", "bad"]  # one shared log: sub-env 1 took no step


def test_started_steps_run_their_programs_first_and_finish_oldest_first_in_index_order():
    from etpo_env.vector import vectorize

    base = PrefetchingProgramEnv()
    vec = vectorize(base, 4)
    vec.reset(seed=0)
    base.events.clear()
    vec.step_async(("p1", "p2", None, None))
    vec.step_async((None, None, "p3", "p4"))
    with pytest.raises(RuntimeError, match="already have a step started"):
        vec.step_async(("p5", None, None, None))
    first = vec.step_wait()
    second = vec.step_wait()
    assert base.events == [("prefetch", "p1"), ("prefetch", "p2"), ("prefetch", "p3"), ("prefetch", "p4"),
                           ("step", "p1"), ("step", "p2"), ("step", "p3"), ("step", "p4")]
    assert first[4]["stepped"].tolist() == [True, True, False, False]
    assert second[4]["stepped"].tolist() == [False, False, True, True]
    with pytest.raises(RuntimeError, match="step_async first"):
        vec.step_wait()
    base.events.clear()
    vec.step((None, None, None, "p6"))  # alone, a program runs in step itself: nothing prefetched
    assert base.events == [("step", "p6")]


def test_closing_the_vector_env_closes_the_siblings_not_the_env_handed_over():
    from etpo_env.vector import vectorize

    base = PrefetchingProgramEnv()
    vec = vectorize(base, 3)
    vec.reset(seed=0)
    siblings = vec.envs[1:]
    vec.close()
    assert all(s.closed for s in siblings) and not base.closed
