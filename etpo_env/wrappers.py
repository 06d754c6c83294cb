"""Wrappers for DataSciCode-v0: an episode recorder (JSONL, usable as SFT data), an env-step budget and reward
normalisation.

`NormalizeReward` is Gymnasium's running-return normaliser, re-exported so one import gives everything; the
task-relative normalisation (0 = baseline pipeline, 1 = reference pipeline) is the env's `reward="normalized"`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.wrappers import NormalizeReward

from etpo_env.info import RECORD_KEYS, StepInfo, status_name

__all__ = ["BudgetExceeded", "EnvStepBudget", "EpisodeRecorder", "NormalizeReward", "RECORD_INFO_KEYS"]

# The step facts an SFT or analysis pipeline needs; long or repeated fields (messages) stay out.
RECORD_INFO_KEYS = RECORD_KEYS


class EpisodeRecorder(gym.Wrapper):
    """Append one JSON line per step to `path`.

    Each line: ``episode`` (counter within this recorder), ``t`` (attempt), ``task``, ``prompt`` (the
    observation the action answered), ``messages`` (the same in chat form), ``action`` (raw text),
    ``program`` (what ran), ``reward``, ``terminated``, ``truncated`` and ``info`` (the `RECORD_INFO_KEYS`
    subset). Filter on ``info.status == "ok"`` or on reward for SFT data. The file is opened on the first step
    and flushed after every line, so a crashed run keeps what it recorded.
    """

    def __init__(self, env: gym.Env, path: str | os.PathLike):
        super().__init__(env)
        self.path = Path(path)
        self._file: Any = None
        self._episode = -1
        self._prompt: str | None = None
        self._messages: list | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode += 1
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
        self._write(record)
        self._prompt, self._messages = obs, info.get("messages")
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        # ASCII escapes keep any action (even one holding a lone surrogate) writable as valid JSON.
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


class BudgetExceeded(RuntimeError):
    """An agent asked for an env step beyond its budget."""


class EnvStepBudget(gym.Wrapper):
    """Counts env steps and refuses any step past `budget` (raises `BudgetExceeded`).

    The step that spends the last unit of budget returns `truncated=True`, so a learner sees a clean episode end
    (a time limit, bootstrapped like any truncation). It also keeps the learning curve (reward per step) and the
    programs to score on test: the best on dev and the last successful one. `on_step` is called after every step.
    """

    def __init__(self, env: gym.Env, budget: int, on_step: Callable[[], None] | None = None):
        super().__init__(env)
        self.budget = int(budget)
        self.on_step = on_step
        self.steps = 0
        self.episodes = 0
        self.rewards: list[float] = []
        self.dev_scores: list[float | None] = []
        self.statuses: list[str] = []
        self.best_program: str | None = None
        self.best_dev_score = -math.inf
        self.final_program: str | None = None
        self.final_dev_score: float | None = None

    @property
    def remaining(self) -> int:
        return self.budget - self.steps

    @property
    def exhausted(self) -> bool:
        return self.steps >= self.budget

    def reset(self, **kwargs):
        self.episodes += 1
        return self.env.reset(**kwargs)

    def step(self, action):
        if self.exhausted:
            raise BudgetExceeded(f"env-step budget of {self.budget} is spent; no further steps are allowed")
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps += 1
        self._record(float(reward), info)
        if self.on_step is not None:
            self.on_step()
        if self.exhausted and not terminated:
            truncated = True
        return obs, reward, terminated, truncated, info

    def _record(self, reward: float, info: StepInfo) -> None:
        status = status_name(info.get("status", ""))
        score = info.get("score")
        score = None if score is None or not math.isfinite(float(score)) else float(score)
        self.rewards.append(reward)
        self.dev_scores.append(score)
        self.statuses.append(status)
        program = info.get("program")
        if status == "ok" and score is not None and program:
            self.final_program, self.final_dev_score = program, score
            if score > self.best_dev_score:
                self.best_program, self.best_dev_score = program, score


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
