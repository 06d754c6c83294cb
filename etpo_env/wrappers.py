"""Wrappers for DataSciCode-v0: an episode recorder (JSONL, usable as SFT data), an env-step budget and reward
normalisation; `spawn_siblings` makes more envs like a wrapped one, under the same (shared) wrappers.

`NormalizeReward` is Gymnasium's running-return normaliser, re-exported so one import gives everything; the
task-relative normalisation (0 = baseline pipeline, 1 = reference pipeline) is the env's `reward="normalized"`.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.wrappers import NormalizeReward, OrderEnforcing, PassiveEnvChecker, TimeLimit

from etpo_env.info import RECORD_KEYS, StepInfo, status_name

__all__ = ["BudgetExceeded", "EnvStepBudget", "EpisodeRecorder", "NormalizeReward", "RECORD_INFO_KEYS",
           "spawn_siblings"]

# The step facts an SFT or analysis pipeline needs; long or repeated fields (messages) stay out.
RECORD_INFO_KEYS = RECORD_KEYS


class _JsonlSink:
    """One JSONL file shared by a recorder and its spawned siblings: opened on the first line, flushed per line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.episodes = 0  # episodes begun by every recorder writing here
        self._file: Any = None

    def new_episode(self) -> int:
        with self.lock:
            self.episodes += 1
            return self.episodes - 1

    def write(self, record: dict[str, Any]) -> None:
        # ASCII escapes keep any action (even one holding a lone surrogate) writable as valid JSON.
        line = json.dumps(record) + "\n"
        with self.lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self.lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class EpisodeRecorder(gym.Wrapper):
    """Append one JSON line per step to `path`.

    Each line: ``episode`` (counter within this recorder), ``t`` (attempt), ``task``, ``prompt`` (the
    observation the action answered), ``messages`` (the same in chat form), ``action`` (raw text),
    ``program`` (what ran), ``reward``, ``terminated``, ``truncated`` and ``info`` (the `RECORD_INFO_KEYS`
    subset). Filter on ``info.status == "ok"`` or on reward for SFT data. The file is opened on the first step
    and flushed after every line, so a crashed run keeps what it recorded.

    `spawn(other_env)` records a sibling env into the same file with the same episode counter (each episode keeps
    one number); closing a sibling leaves the file to this recorder.
    """

    def __init__(self, env: gym.Env, path: str | os.PathLike, sink: _JsonlSink | None = None):
        super().__init__(env)
        self._owns_sink = sink is None
        self._sink = sink or _JsonlSink(path)
        self.path = self._sink.path
        self._episode = -1
        self._prompt: str | None = None
        self._messages: list | None = None

    def spawn(self, env: gym.Env) -> EpisodeRecorder:
        """`env` recorded into this recorder's file (see the class docstring)."""
        return EpisodeRecorder(env, self.path, sink=self._sink)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode = self._sink.new_episode()
        self._prompt, self._messages = obs, info.get("messages")
        return obs, info

    def step(self, action: str):
        obs, reward, terminated, truncated, info = self.env.step(action)
        record = {
            "episode": self._episode,
            "t": info.get("attempt"),
            "task": getattr(getattr(self.env.unwrapped, "task", None), "name", None),
            "prompt": self._prompt,
            "messages": self._messages,
            "action": action,
            "program": info.get("program"),
            "reward": _json_number(reward),
            "terminated": bool(terminated),
            "truncated": bool(truncated),
            "info": {key: _jsonable(info[key]) for key in RECORD_INFO_KEYS if key in info},
        }
        self._sink.write(record)
        self._prompt, self._messages = obs, info.get("messages")
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        if self._owns_sink:
            self._sink.close()
        super().close()


class BudgetExceeded(RuntimeError):
    """An agent asked for an env step beyond its budget."""


class _BudgetLedger:
    """What an `EnvStepBudget` and every sibling it spawned count together: one budget, one learning curve.

    Steps are reserved under a lock before they run, so concurrent siblings can never spend more than `budget`."""

    def __init__(self, budget: int, on_step: Callable[[], None] | None):
        self.budget = int(budget)
        self.on_step = on_step
        self.lock = threading.Lock()
        self.reserved = 0  # steps begun (a step in flight holds one unit)
        self.steps = 0
        self.episodes = 0
        self.rewards: list[float] = []
        self.dev_scores: list[float | None] = []
        self.statuses: list[str] = []
        self.best_program: str | None = None
        self.best_dev_score = -math.inf
        self.final_program: str | None = None
        self.final_dev_score: float | None = None

    def reserve(self) -> None:
        with self.lock:
            if self.reserved >= self.budget:
                raise BudgetExceeded(f"env-step budget of {self.budget} is spent; no further steps are allowed")
            self.reserved += 1

    def release(self) -> None:
        with self.lock:
            self.reserved -= 1

    def record(self, reward: float, info: StepInfo) -> bool:
        """Count one finished step; returns whether it spent the last unit of the budget."""
        status = status_name(info.get("status", ""))
        score = info.get("score")
        score = None if score is None or not math.isfinite(float(score)) else float(score)
        program = info.get("program")
        with self.lock:
            self.steps += 1
            self.rewards.append(reward)
            self.dev_scores.append(score)
            self.statuses.append(status)
            if status == "ok" and score is not None and program:
                self.final_program, self.final_dev_score = program, score
                if score > self.best_dev_score:
                    self.best_program, self.best_dev_score = program, score
            return self.steps >= self.budget


def _ledger_field(name: str) -> property:
    return property(lambda self: getattr(self.ledger, name), doc=f"The shared ledger's `{name}`.")


class EnvStepBudget(gym.Wrapper):
    """Counts env steps and refuses any step past `budget` (raises `BudgetExceeded`).

    The step that spends the last unit of budget returns `truncated=True`, so a learner sees a clean episode end
    (a time limit, bootstrapped like any truncation). It also keeps the learning curve (reward per step) and the
    programs to score on test: the best on dev and the last successful one. `on_step` is called after every step.

    `spawn(other_env)` wraps a sibling env (e.g. a learner's extra env for batched collection) in a budget that
    shares this one's ledger: one budget for all, every sibling's step in `steps`, `rewards`, `statuses`,
    `episodes` and the best/final programs, in the order the steps finished. Steps are reserved before they run,
    so siblings stepping concurrently cannot overshoot either.
    """

    steps = _ledger_field("steps")
    episodes = _ledger_field("episodes")
    rewards = _ledger_field("rewards")
    dev_scores = _ledger_field("dev_scores")
    statuses = _ledger_field("statuses")
    best_program = _ledger_field("best_program")
    best_dev_score = _ledger_field("best_dev_score")
    final_program = _ledger_field("final_program")
    final_dev_score = _ledger_field("final_dev_score")

    def __init__(self, env: gym.Env, budget: int, on_step: Callable[[], None] | None = None,
                 ledger: _BudgetLedger | None = None):
        super().__init__(env)
        self.ledger = ledger or _BudgetLedger(budget, on_step)

    def spawn(self, env: gym.Env) -> EnvStepBudget:
        """`env` under a budget that shares this one's ledger (see the class docstring)."""
        return EnvStepBudget(env, self.budget, ledger=self.ledger)

    @property
    def budget(self) -> int:
        return self.ledger.budget

    @property
    def on_step(self) -> Callable[[], None] | None:
        return self.ledger.on_step

    @property
    def remaining(self) -> int:
        return self.budget - self.steps

    @property
    def exhausted(self) -> bool:
        return self.steps >= self.budget

    def reset(self, **kwargs):
        with self.ledger.lock:
            self.ledger.episodes += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        self.ledger.reserve()
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except BaseException:
            self.ledger.release()  # the step did not happen
            raise
        spent = self.ledger.record(float(reward), info)
        if self.on_step is not None:
            self.on_step()
        if spent and not terminated:
            truncated = True
        return obs, reward, terminated, truncated, info


# Gymnasium wrappers whose state belongs to one env's episodes: a sibling gets its own, with the same arguments.
_PER_ENV_WRAPPERS = (OrderEnforcing, TimeLimit)
# Wrappers that only check the env they wrap: a sibling of a checked env is the same kind of env and needs none.
_CHECK_ONLY_WRAPPERS = (PassiveEnvChecker,)


def spawn_siblings(env: gym.Env, count: int) -> list[gym.Env]:
    """`count` new envs like `env`, for collecting from several envs at once when one env was handed over
    (`etpo_env.vector.vectorize` is the one caller).

    Each sibling is a fresh base env built from `env`'s own (its `spawn()`, or for `DataSciCode-v0` its
    `EnvConfig`, sharing its sandbox once it has one) under the same wrapper chain: a wrapper with a `spawn(inner)`
    method (`EnvStepBudget`, `EpisodeRecorder`) shares its state with the sibling — one budget, one record of every
    step — and Gymnasium's per-env wrappers (`OrderEnforcing`, `TimeLimit`) are made anew with their arguments.
    Raises `ValueError`, saying what to do, when some layer cannot be replicated faithfully (e.g. `NormalizeReward`,
    whose running statistics belong to one stream of steps).
    """
    layers = []
    inner = env
    while isinstance(inner, gym.Wrapper):
        layers.append(inner)
        inner = inner.env
    for layer in layers:
        if not _spawnable(layer):
            raise ValueError(
                f"cannot replicate the wrapper {type(layer).__name__} for batched collection: give it a "
                f"spawn(inner) method that wraps `inner` the same way (sharing what must be shared, as EnvStepBudget "
                f"does), pass a vector env (gym.make_vec(..., wrappers=[...])), or use num_envs=1")
    make_base = _base_spawner(inner)
    if make_base is None:
        raise ValueError(f"cannot make siblings of {type(inner).__name__}: give it a spawn() method that returns a "
                         f"fresh env like it, pass a vector env (gym.make_vec(..., wrappers=[...])), or use num_envs=1")
    siblings = []
    for _ in range(count):
        sibling = make_base()
        for layer in reversed(layers):
            sibling = _rewrap(layer, sibling)
        siblings.append(sibling)
    return siblings


def _base_spawner(base: gym.Env) -> Callable[[], gym.Env] | None:
    if callable(getattr(base, "spawn", None)):
        return base.spawn
    from etpo_env.env import DataSciCodeEnv

    if not isinstance(base, DataSciCodeEnv):
        return None
    config = base.config
    if base.sandbox is not None:  # share the sandbox in use (a warm worker) instead of starting one per sibling
        config = config.replace(sandbox=base.sandbox, limits=None)
    return lambda: DataSciCodeEnv(config, render_mode=base.render_mode)


def _spawnable(layer: gym.Wrapper) -> bool:
    return callable(getattr(layer, "spawn", None)) or isinstance(layer, _PER_ENV_WRAPPERS + _CHECK_ONLY_WRAPPERS)


def _rewrap(layer: gym.Wrapper, inner: gym.Env) -> gym.Env:
    if callable(getattr(layer, "spawn", None)):
        return layer.spawn(inner)
    if isinstance(layer, _CHECK_ONLY_WRAPPERS):
        return inner
    return type(layer)(inner, **getattr(layer, "_saved_kwargs", {}))


def _json_number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value
