"""Wrappers for DataSciCode-v0: an episode recorder (JSONL, usable as SFT data) and reward normalisation.

`NormalizeReward` is Gymnasium's running-return normaliser, re-exported so one import gives everything; the
task-relative normalisation (0 = baseline pipeline, 1 = reference pipeline) is the env's `reward="normalized"`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
from gymnasium.wrappers import NormalizeReward

__all__ = ["EpisodeRecorder", "NormalizeReward", "RECORD_INFO_KEYS"]

# The step facts an SFT or analysis pipeline needs; long or repeated fields (messages) stay out.
RECORD_INFO_KEYS = (
    "status",
    "error_type",
    "message",
    "traceback",
    "stdout",
    "stderr",
    "split_scores",
    "score",
    "normalized_score",
    "attempt",
    "best_score",
    "isolation",
)


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
