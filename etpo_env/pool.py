"""Pooled mode: many envs in one process share a bounded set of sandboxes and step concurrently.

A program run is mostly waiting on a sandboxed child process, so threads are enough to overlap the steps of
different envs; `SandboxPool` bounds how many run at once (and how many sandboxes exist), and
`ThreadedVectorEnv` is Gymnasium's `SyncVectorEnv` with the envs' `step` calls spread over a thread pool.

    envs = gym.make_vec("DataSciCode-v0", num_envs=8, vectorization_mode="vector_entry_point", pool_size=4)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import concatenate, iterate

from etpo_env.config import EnvConfig


class SandboxPool:
    """Up to `size` sandboxes, created on demand and shared; `run` borrows an idle one (or waits for one).

    It satisfies the `sandbox.Sandbox` protocol, so it can be passed as `sandbox=` to any number of envs.
    `close()` closes every sandbox it created and is idempotent.
    """

    def __init__(
        self,
        size: int = 2,
        backend: str = "auto",
        limits: Any = None,
        factory: Callable[[], Any] | None = None,
    ):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        self.isolation = ""  # known after the first run
        self._factory = factory or _sandbox_factory(backend, limits)
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue = queue.LifoQueue()  # LIFO: the most recently used (warm) sandbox first
        self._created: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def run(self, job: Any) -> Any:
        if self._closed:
            raise RuntimeError("the SandboxPool is closed")
        with self._slots:
            sandbox = self._checkout()
            try:
                result = sandbox.run(job)
            finally:
                self._idle.put(sandbox)
        self.isolation = self.isolation or getattr(result, "isolation", "")
        return result

    @property
    def started(self) -> int:
        """How many sandboxes exist now (0 until the first run)."""
        return len(self._created)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sandboxes, self._created = self._created, []
            self._idle = queue.LifoQueue()
        for sandbox in sandboxes:
            sandbox.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _checkout(self) -> Any:
        # Holding a slot means fewer than `size` sandboxes are busy, so with none idle one more may be made.
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the SandboxPool is closed") from None
                sandbox = self._factory()
                self._created.append(sandbox)
                return sandbox


def _sandbox_factory(backend: str, limits: Any) -> Callable[[], Any]:
    def make() -> Any:
        from sandbox import make_sandbox

        return make_sandbox(backend, limits=limits, parallelism=1)  # the pool's size bounds concurrency

    return make


class ThreadedVectorEnv(SyncVectorEnv):
    """`SyncVectorEnv` whose sub-env steps run concurrently in a thread pool (same autoreset semantics).

    Use it with envs that spend their step waiting on I/O or a subprocess, like `DataSciCode-v0`.
    `owned` objects (e.g. the envs' shared `SandboxPool`) are closed after the envs.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        max_workers: int | None = None,
        owned: Sequence[Any] = (),
        **kwargs: Any,
    ):
        super().__init__(env_fns, **kwargs)
        self._executor = ThreadPoolExecutor(max_workers=max_workers or self.num_envs, thread_name_prefix="env")
        self._owned = list(owned)

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = list(iterate(self.action_space, actions))
        results = list(self._executor.map(self._step_one, range(self.num_envs), actions))
        infos: dict[str, Any] = {}
        for i, (obs, reward, terminated, truncated, info, final) in enumerate(results):
            self._env_obs[i] = obs
            self._rewards[i], self._terminations[i], self._truncations[i] = reward, terminated, truncated
            if final is not None:
                infos = self._add_info(infos, final, i)
            infos = self._add_info(infos, info, i)
        self._observations = concatenate(self.single_observation_space, self._env_obs, self._observations)
        self._autoreset_envs = np.logical_or(self._terminations, self._truncations)
        return (
            deepcopy(self._observations) if self.copy else self._observations,
            np.copy(self._rewards),
            np.copy(self._terminations),
            np.copy(self._truncations),
            infos,
        )

    def _step_one(self, i: int, action: Any) -> tuple:
        """One sub-env's step under the vector env's autoreset mode; runs in a worker thread."""
        env = self.envs[i]
        if self.autoreset_mode == AutoresetMode.NEXT_STEP and self._autoreset_envs[i]:
            obs, info = env.reset()
            return obs, 0.0, False, False, info, None
        if self.autoreset_mode == AutoresetMode.DISABLED:
            assert not self._autoreset_envs[i], "autoreset is disabled: reset finished sub-envs first"
        obs, reward, terminated, truncated, info = env.step(action)
        final = None
        if self.autoreset_mode == AutoresetMode.SAME_STEP and (terminated or truncated):
            final = {"final_obs": obs, "final_info": info}
            obs, info = env.reset()
        return obs, reward, terminated, truncated, info, final

    def close_extras(self, **kwargs: Any) -> None:
        self._executor.shutdown(wait=True)
        super().close_extras(**kwargs)
        for resource in self._owned:
            resource.close()
        self._owned = []


def make_pooled_vec_env(
    num_envs: int = 2,
    pool_size: int | None = None,
    sandbox: Any = None,
    limits: Any = None,
    **env_kwargs: Any,
) -> ThreadedVectorEnv:
    """`num_envs` DataSciCode envs sharing one `SandboxPool` of `pool_size` sandboxes (default: `num_envs`).

    This is the `vector_entry_point` of `DataSciCode-v0`; `env_kwargs` (an `EnvConfig` as `config=`, and/or its
    fields by name) describe each env. `sandbox` and `limits` default to the config's (`"auto"`, none). With a
    sandbox instance, the envs share that instance instead (its own parallelism then bounds the concurrency) and it
    is not closed here.
    """
    from etpo_env.env import DataSciCodeEnv

    env_kwargs.pop("max_episode_steps", None)  # episodes end by rule (max_attempts)
    config = env_kwargs.pop("config", None)
    if config is not None and not isinstance(config, EnvConfig):
        env_kwargs = {"task": config, **env_kwargs}  # the env's first argument used to be the task
        config = None
    config = config or EnvConfig()
    sandbox = config.sandbox if sandbox is None else sandbox
    limits = config.limits if limits is None else limits
    if isinstance(sandbox, str):
        shared = SandboxPool(size=pool_size or num_envs, backend=sandbox, limits=limits)
        owned = [shared]
    else:
        if limits is not None:
            raise ValueError("limits apply to sandboxes the pool creates; set them on the shared sandbox instead")
        shared, owned = sandbox, []
    env_fns = [lambda: DataSciCodeEnv(config, sandbox=shared, limits=None, **env_kwargs) for _ in range(num_envs)]
    return ThreadedVectorEnv(env_fns, max_workers=num_envs, owned=owned)
