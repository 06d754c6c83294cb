"""Vector envs of DataSciCode-v0: many envs in one process whose program runs overlap.

A program run is mostly waiting on a sandboxed child process, so threads are enough to overlap the steps of
different envs. Two vector envs, one for each way of getting many envs:

- `ThreadedVectorEnv` (the registered `vector_entry_point`): Gymnasium's `SyncVectorEnv` with the envs' `step`
  calls spread over a thread pool; its envs share a `SandboxPool`, which bounds how many programs run at once;

      envs = gym.make_vec("DataSciCode-v0", num_envs=8, vectorization_mode="vector_entry_point", pool_size=4)

- `SiblingVectorEnv`, made by `vectorize(env, num_envs)` from one env a user has already wrapped (a budget, a
  recorder, a reward probe): the env and `num_envs − 1` siblings under the same wrappers, one budget and one record
  for all. This is how a learner handed a single env collects from many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import concatenate, iterate

from etpo_env.config import EnvConfig
from etpo_env.wrappers import spawn_siblings
from sandbox.pool import SandboxPool


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


@runtime_checkable
class Prefetching(Protocol):
    """A base env that can begin running an action's program before it is stepped (`DataSciCodeEnv.prefetch`): the
    step then takes that run's result, and nothing else changes."""

    def prefetch(self, action: Any) -> None: ...


class SiblingVectorEnv(gym.vector.VectorEnv):
    """One wrapped env and its siblings stepped as one vector env (made by `vectorize`).

    Sub-env 0 is the env handed over (its owner closes it); the others are its siblings (`spawn_siblings`: fresh
    base envs sharing its sandbox, under the same wrapper chain, whose stateful wrappers share their state: one
    `EnvStepBudget` ledger counts every sub-env's steps, one `EpisodeRecorder` file holds them). The siblings are
    made when sub-env 0 is first reset, so they share the sandbox it started.

    Gymnasium's vector API with autoreset DISABLED: the caller resets finished sub-envs itself with
    `reset(options={"reset_mask": mask})`, so no episode is begun that is not played. Two documented additions a
    batched collector needs:

    - an action of `None` leaves that sub-env out of the step (its observation comes back unchanged, its reward 0,
      `infos["stepped"]` False there): a round can step fewer sub-envs than there are, so a budget is never
      overshot;
    - the stepped sub-envs' programs run side by side: `step_async` starts each one on the shared sandbox (the env's
      `prefetch`), `step_wait` then steps the sub-envs one after another in index order, each taking its program's
      result. The runs overlap while everything a step changes (episodes, budget, records) happens in a fixed
      order. Several started steps over disjoint sub-envs may be outstanding; `step_wait` finishes the oldest (one
      half of the envs can run its programs while the other half's actions are generated).
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED}

    def __init__(self, env: gym.Env, num_envs: int):
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        self.num_envs = int(num_envs)
        if self.num_envs > 1:  # raises now, saying what to do, if the env's wrappers cannot be replicated
            spawn_siblings(env, 0)
        self.envs: list[gym.Env] = [env]
        self.single_observation_space = env.observation_space
        self.single_action_space = env.action_space
        self.observation_space = gym.vector.utils.batch_space(env.observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(env.action_space, self.num_envs)
        self.render_mode = env.render_mode
        self._observations: list[Any] = [None] * self.num_envs
        self._started: list[tuple[list[int], list[Any]]] = []  # step_async calls not yet finished, oldest first

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None
              ) -> tuple[tuple, dict[str, Any]]:
        """Reset the sub-envs of `options["reset_mask"]` (all without one); `seed`: an int seeds sub-env i with
        seed + i (as Gymnasium's vector envs do), a list gives each sub-env's seed (None: not reseeded)."""
        options = dict(options or {})
        mask = np.asarray(options.pop("reset_mask", np.ones(self.num_envs, dtype=bool)), dtype=bool)
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
        if len(self.envs) < self.num_envs and not mask[0]:
            raise ValueError("reset sub-env 0 first: its siblings are made from it (and share its sandbox)")
        seeds = ([None if seed is None else seed + i for i in range(self.num_envs)] if not isinstance(seed, Sequence)
                 else list(seed))
        infos: dict[str, Any] = {}
        for i in np.flatnonzero(mask):
            self._observations[i], info = self.envs[i].reset(seed=seeds[i], options=options or None)
            infos = self._add_info(infos, info, int(i))
            if i == 0 and len(self.envs) < self.num_envs:
                self.envs += spawn_siblings(self.envs[0], self.num_envs - 1)
        return tuple(self._observations), infos

    def step(self, actions: Sequence[Any]) -> tuple[tuple, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        self._start(actions, background=sum(action is not None for action in actions) > 1)
        return self.step_wait()  # alone, a program gains nothing from running in the background

    def step_async(self, actions: Sequence[Any]) -> None:
        """Start the programs of the sub-envs whose action is not None (see the class docstring)."""
        self._start(actions, background=True)

    def _start(self, actions: Sequence[Any], background: bool) -> None:
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions (None: not stepped), got {len(actions)}")
        stepped = [i for i, action in enumerate(actions) if action is not None]
        busy = {i for started, _ in self._started for i in started}
        if busy.intersection(stepped):
            raise RuntimeError(f"sub-envs {sorted(busy.intersection(stepped))} already have a step started")
        for i in stepped if background else ():
            base = self.envs[i].unwrapped
            if isinstance(base, Prefetching):
                base.prefetch(actions[i])
        self._started.append((stepped, [actions[i] for i in stepped]))

    def step_wait(self) -> tuple[tuple, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step the sub-envs of the oldest started step, one after another in index order."""
        if not self._started:
            raise RuntimeError("step_wait() without a started step (call step_async first)")
        stepped, actions = self._started.pop(0)
        rewards = np.zeros(self.num_envs)
        terminations = np.zeros(self.num_envs, dtype=bool)
        truncations = np.zeros(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {"stepped": np.isin(np.arange(self.num_envs), stepped)}
        for i, action in zip(stepped, actions, strict=True):
            self._observations[i], rewards[i], terminations[i], truncations[i], info = self.envs[i].step(action)
            infos = self._add_info(infos, info, i)
        return tuple(self._observations), rewards, terminations, truncations, infos

    def _add_info(self, vector_infos: dict[str, Any], env_info: dict[str, Any], env_num: int) -> dict[str, Any]:
        """Gymnasium's dict of per-env arrays with `_key` presence masks, in object arrays: each sub-env's values
        come back as they were (Gymnasium's own typed arrays turn a None score into NaN, a program into numpy text)."""
        for key, value in env_info.items():
            if key not in vector_infos:
                vector_infos[key] = np.full(self.num_envs, None, dtype=object)
                vector_infos["_" + key] = np.zeros(self.num_envs, dtype=bool)
            vector_infos[key][env_num] = value
            vector_infos["_" + key][env_num] = True
        return vector_infos

    def close_extras(self, **kwargs: Any) -> None:
        """Close the siblings (the env handed over stays its owner's)."""
        siblings, self.envs = self.envs[1:], self.envs[:1]
        for sibling in siblings:
            sibling.close()


def vectorize(env: gym.Env | gym.vector.VectorEnv, num_envs: int) -> gym.vector.VectorEnv:
    """The vector env a learner collects from: a vector env as it is; a single env as a `SiblingVectorEnv` of
    `num_envs` sub-envs (the env and its siblings). Raises `ValueError` if a wrapper of `env` cannot be replicated."""
    if isinstance(env, gym.vector.VectorEnv):
        return env
    return SiblingVectorEnv(env, num_envs)
