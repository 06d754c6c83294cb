"""What an agent is: the `Agent` and `Learner` protocols, two reference agents needing no model, and `play`, the one
episode driver for stepping an agent outside a learner.

Any object with `reset()` and `act(obs, info) -> str` can be benchmarked; a plain callable `obs -> str` is wrapped by
`as_agent`. Learners add `learn(env, budget, callbacks, out_dir)`, `save(dir)` and `load(dir)`.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# A plain, sound sklearn pipeline: the "scripted" agent submits it every step. A fixed point of reference on any task
# (numeric or categorical columns, missing values, pandas or numpy input) that any learner should come close to.
SCRIPTED_PROGRAM = '''\
def build_model(X, y):
    import pandas as pd
    from sklearn.compose import make_column_selector, make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

    numeric = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
    categorical = make_pipeline(FunctionTransformer(lambda frame: frame.astype(str)),
                                OneHotEncoder(handle_unknown="ignore"))
    features = make_column_transformer(
        (numeric, make_column_selector(dtype_include="number")),
        (categorical, make_column_selector(dtype_exclude="number")),
    )
    model = make_pipeline(FunctionTransformer(pd.DataFrame), features, LogisticRegression(max_iter=1000))
    return model.fit(X, y)
'''


@runtime_checkable
class Agent(Protocol):
    """Acts in DataSciCode-v0: given the prompt (and the env's info dict) returns the next code string."""

    def reset(self) -> None: ...

    def act(self, obs: str, info: dict) -> str: ...


@runtime_checkable
class Learner(Agent, Protocol):
    """An agent that improves from env interaction. `budget` counts env steps (sandbox runs)."""

    def learn(self, env: Any, budget: int, callbacks: Any = None, out_dir: str | Path | None = None) -> dict: ...

    def save(self, directory: str | Path) -> None: ...

    @classmethod
    def load(cls, directory: str | Path) -> Learner: ...


class ScriptedAgent:
    """Always answers with the same program (by default `SCRIPTED_PROGRAM`): a fixed reference point and a test
    double."""

    def __init__(self, program: str = SCRIPTED_PROGRAM):
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


@dataclass
class PlayResult:
    """What `play` saw: env steps and episodes started, the summed reward, and the best successful step."""

    steps: int = 0
    episodes: int = 0
    total_reward: float = 0.0
    best_score: float | None = None
    best_program: str | None = None
    last_info: dict | None = None


def play(env: Any, agent: Any, steps: int | None = None, *, seed: int | None = None, episodes: int | None = None,
         stop: Callable[[], bool] | None = None, callback: Callable[[dict], Any] | None = None) -> PlayResult:
    """Step `agent` (an `Agent` or a plain callable `obs -> str`) in `env`, resetting both at each episode start.

    Runs until `steps` env steps, `episodes` finished episodes, or `stop()` is true (checked before each step; the
    benchmark passes its budget wrapper's `exhausted`), whichever comes first; an episode is never started without a
    step left to take in it. The first reset gets `seed`, later ones none (the env's generator carries on).
    `callback` receives `{"env_steps", "reward", "info"}` after every step.
    """
    agent = as_agent(agent)
    result = PlayResult()
    done = True
    while True:
        if (steps is not None and result.steps >= steps) or (stop is not None and stop()):
            break
        if done:
            if episodes is not None and result.episodes >= episodes:
                break
            agent.reset()
            obs, info = env.reset(seed=seed) if result.episodes == 0 else env.reset()
            result.episodes += 1
            done = False
        action = agent.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        result.steps += 1
        result.total_reward += float(reward)
        result.last_info = info
        score = info.get("score")
        if score is not None and (result.best_score is None or score > result.best_score):
            result.best_score, result.best_program = float(score), info.get("program")
        if callback is not None:
            callback({"env_steps": result.steps, "reward": float(reward), "info": info})
        done = bool(terminated or truncated)
    return result


def run_episode(env: Any, agent: Any, seed: int | None = None, max_steps: int | None = None) -> dict:
    """Play one episode of `agent` in `env`; returns the return, the step count, and the best score seen."""
    result = play(env, agent, max_steps, seed=seed, episodes=1)
    return {"return": result.total_reward, "steps": result.steps, "best_score": result.best_score,
            "last_info": result.last_info}
