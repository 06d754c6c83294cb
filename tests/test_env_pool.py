"""Pooled mode: SandboxPool bounds and shares sandboxes; ThreadedVectorEnv steps envs concurrently.

The concurrency checks use a sandbox double that sleeps, so overlap is visible in wall time; the real sandbox
path of the pooled vector env is covered in test_env.py.
"""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode

import tasks
from etpo_env.env import DataSciCodeEnv
from etpo_env.pool import SandboxPool, ThreadedVectorEnv, make_pooled_vec_env
from sandbox import RunResult, Status

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

    monkeypatch.setattr("etpo_env.pool._sandbox_factory", fake_factory)
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
    monkeypatch.setattr("etpo_env.pool.SandboxPool",
                        lambda size, backend, limits: seen.append(backend) or original(size=size, factory=SleepySandbox))
    envs = make_pooled_vec_env(num_envs=2, config=EnvConfig(task=task, sandbox="local", max_attempts=2))
    assert seen == ["local"] and [e.unwrapped.max_attempts for e in envs.envs] == [2, 2]
    envs.close()


def test_pooled_kwargs_errors(task):
    with pytest.raises(ValueError, match="limits"):
        make_pooled_vec_env(num_envs=2, sandbox=SleepySandbox(), limits=object(), task=task)
    with pytest.raises(ValueError, match="size"):
        SandboxPool(size=0)
