"""What an agent is: the `Agent` and `Learner` protocols, plus two reference agents needing no model.

Any object with `reset()` and `act(obs, info) -> str` can be benchmarked; a plain callable `obs -> str` is wrapped by
`as_agent`. Learners add `learn(env, budget, callback)`, `save(dir)` and `load(dir)`.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Agent(Protocol):
    """Acts in DataSciCode-v0: given the prompt (and the env's info dict) returns the next code string."""

    def reset(self) -> None: ...

    def act(self, obs: str, info: dict) -> str: ...


@runtime_checkable
class Learner(Agent, Protocol):
    """An agent that improves from env interaction. `budget` counts env steps (sandbox runs)."""

    def learn(self, env: Any, budget: int, callback: Callable[[dict], Any] | None = None) -> dict: ...

    def save(self, directory: str | Path) -> None: ...

    @classmethod
    def load(cls, directory: str | Path) -> Learner: ...


class ScriptedAgent:
    """Always answers with the same program: a fixed reference point and a test double."""

    def __init__(self, program: str):
        if not isinstance(program, str):
            raise TypeError(f"program must be a str, got {type(program).__name__}")
        self.program = program

    def reset(self) -> None:
        pass

    def act(self, obs: str, info: dict | None = None) -> str:
        return self.program


class RandomProgramAgent:
    """Answers with a program drawn uniformly from the demonstration corpus (valid and buggy ones alike).

    A floor for every learner: anything that learns must beat picking a corpus program at random.
    """

    def __init__(self, seed: int = 0, corpus_size: int = 500, buggy_fraction: float = 0.2,
                 programs: list[str] | None = None):
        if programs is None:
            from tasks import demos  # deferred: the corpus is only needed when this agent is used

            programs = [d.program for d in demos.corpus(n=corpus_size, seed=seed, buggy_fraction=buggy_fraction)]
        if not programs:
            raise ValueError("RandomProgramAgent needs at least one program")
        self.programs = list(programs)
        self.seed = seed
        self._rng = random.Random(seed)

    def reset(self) -> None:
        pass

    def act(self, obs: str, info: dict | None = None) -> str:
        return self._rng.choice(self.programs)


class CallableAgent:
    """Adapts a plain function `obs -> str` (or `(obs, info) -> str`) to the `Agent` protocol."""

    def __init__(self, fn: Callable[..., str]):
        self.fn = fn
        self._takes_info = _accepts_two_positional(fn)

    def reset(self) -> None:
        pass

    def act(self, obs: str, info: dict | None = None) -> str:
        action = self.fn(obs, info or {}) if self._takes_info else self.fn(obs)
        if not isinstance(action, str):
            raise TypeError(f"agent callable returned {type(action).__name__}, expected str")
        return action


def _accepts_two_positional(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume obs only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def as_agent(agent_or_callable: Any) -> Agent:
    """Return an `Agent`: objects with `act` pass through (a missing `reset` is tolerated), callables are wrapped."""
    if hasattr(agent_or_callable, "act"):
        if not hasattr(agent_or_callable, "reset"):
            return _WithReset(agent_or_callable)
        return agent_or_callable
    if callable(agent_or_callable):
        return CallableAgent(agent_or_callable)
    raise TypeError(f"{type(agent_or_callable).__name__} is neither an Agent (reset/act) nor a callable obs -> str")


class _WithReset:
    def __init__(self, inner: Any):
        self.inner = inner

    def reset(self) -> None:
        pass

    def act(self, obs: str, info: dict | None = None) -> str:
        return self.inner.act(obs, info or {})


def run_episode(env: Any, agent: Any, seed: int | None = None, max_steps: int | None = None) -> dict:
    """Play one episode of `agent` in `env`; returns the return, the step count, and the best score seen."""
    agent = as_agent(agent)
    agent.reset()
    obs, info = env.reset(seed=seed)
    total, steps, best = 0.0, 0, None
    while True:
        action = agent.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        steps += 1
        score = info.get("score")
        if score is not None and (best is None or score > best):
            best = score
        if terminated or truncated or (max_steps is not None and steps >= max_steps):
            break
    return {"return": total, "steps": steps, "best_score": best, "last_info": info}
