"""The policy's evaluation: fresh episodes at fixed seeds (common random numbers across agents and points), played
in lock-step where the agent acts in batches, their final programs scored once on the task's held-out test part.
The protocol is in `agents.benchmark.run`'s docstring."""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import etpo_env  # noqa: F401  (registers DataSciCode-v0)
import tasks as tasks_pkg
from agents.base import as_agent
from agents.benchmark.config import BenchConfig
from agents.benchmark.statistics import CHANCE_SCORE
from agents.registry import (
    is_learner,
)
from etpo_env.info import status_name

if TYPE_CHECKING:
    from sandbox.api import Sandbox
    from tasks.task import Task


def eval_seed(task: str, seed: int, point: int, episode: int) -> int:
    """The env seed of one evaluation episode, a function of (task, seed, point index, episode index) that is the
    same at every point: common random numbers, so a policy that did not change plays its episodes again exactly
    and the difference between two points measures the change, not a new draw of episodes."""
    del point  # every point replays the same K episode seeds
    digest = hashlib.sha256(f"{task}/{seed}/{episode}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed Python, numpy and torch (when loaded) for a block, then restore their states, and turn autograd off:
    evaluation samples reproducibly and leaves training's random streams and gradients as they were."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        if "torch" in sys.modules:
            import torch

            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                yield
        else:
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)



class _Episode:
    """One evaluation episode's bookkeeping: attempts, the first attempt that ran, the program to score on test."""

    def __init__(self, seed: int, mode: str):
        self.seed, self.mode = seed, mode
        self.attempts = 0
        self.episode_return = 0.0  # the env's reward summed over the episode: what the learners maximise
        self.first_success: int | None = None
        self.program: str | None = None
        self.dev_score: float | None = None
        self.done = False

    def record(self, info: dict, reward: float, terminated: bool, truncated: bool) -> None:
        self.attempts += 1
        self.episode_return += float(reward)
        ran = status_name(info.get("status", "")) == "ok" and bool(info.get("program"))
        if ran:
            if self.first_success is None:
                self.first_success = self.attempts
            if self.mode != "refine":  # fix mode: the program that ran (the episode ends with it)
                self.program, self.dev_score = info["program"], info.get("score")
        if self.mode == "refine" and info.get("best_program"):
            self.program, self.dev_score = info["best_program"], info.get("best_score")
        self.done = bool(terminated or truncated)


class TestScorer:
    """Scores programs once on the task's held-out test part (`tasks.evaluate`), remembering each program's score."""

    def __init__(self, task: Task, sandbox: Sandbox | None, seed: int):
        self.task, self.sandbox, self.seed = task, sandbox, seed
        self._seen: dict[str, dict[str, Any]] = {}

    def score_all(self, programs: Sequence[str | None]) -> list[dict[str, Any]]:
        """`score` of each program; the programs not scored yet run on test concurrently."""
        new = list(dict.fromkeys(p for p in programs if p is not None and p not in self._seen))
        if len(new) > 1:
            with ThreadPoolExecutor(max_workers=len(new)) as pool:
                list(pool.map(self.score, new))
        return [self.score(p) for p in programs]

    def score(self, program: str | None) -> dict[str, Any]:
        """{test_status, test_score, score, normalized}; no program, or one failing on test, scores the chance level."""
        if program is None:
            result = {"test_status": "no_program", "test_score": None, "test_message": "no program ran on dev"}
        elif program in self._seen:
            result = dict(self._seen[program])
        else:
            evaluation = tasks_pkg.evaluate(self.task, program, self.sandbox, part="test", seed=self.seed)
            result = {"test_status": status_name(evaluation.status), "test_score": evaluation.score,
                      "test_message": evaluation.result.message if evaluation.score is None else ""}
            self._seen[program] = dict(result)
        counted = result["test_score"] if result["test_score"] is not None else CHANCE_SCORE
        normalized = self.task.normalize(counted, part="test")  # None when the task has no stored reference scores
        return {**result, "score": float(counted), "normalized": None if normalized is None else float(normalized)}


def batch_actor(agent: Any) -> Callable[[list[str], list[dict]], list[str]] | None:
    """How to act on several episodes at once: the agent's own `act_batch`; for this package's learners, the
    shell's `act_batch` with a sampling stream of the evaluation's own; None where episodes must run one by one
    (no `act_batch`, or a learner that overrides `act` alone)."""
    shell = getattr(sys.modules.get("agents.learner"), "Learner", None)
    if shell is None or not isinstance(agent, shell):
        return agent.act_batch if callable(getattr(agent, "act_batch", None)) else None
    if type(agent).act_batch is not shell.act_batch:
        return agent.act_batch
    if type(agent).act is not shell.act:
        return None

    import torch

    # Seeded from the evaluation seed (`isolated_rng`): a policy with a seeded stream of its own
    # (`generation.seed`) keeps it for training.
    stream = torch.Generator(device=agent.policy.device).manual_seed(torch.initial_seed())
    return lambda observations, infos: agent.act_batch(observations, infos, generator=stream)


def learns(agent: Any) -> bool:
    """Whether the agent is trained between evaluation points: it has `learn`, and its policy can change (a
    prompting agent's `learn` only plays episodes with a fixed model; no state carries across episodes)."""
    prompting = getattr(sys.modules.get("agents.prompting"), "PromptingAgent", None)
    return is_learner(agent) and not (prompting is not None and isinstance(agent, prompting))


def probe_rate(agent: Any, env: Any, samples: int, seed: int) -> float:
    """A reward probe's rate under the agent's current policy (`etpo_env.probes`): `env.reward_of` averaged over
    `samples` fresh actions for the first prompt of `env.reset(seed=seed)`, sampled in one batch under
    `isolated_rng(seed)`; no env step, so no program runs and training's random streams are untouched."""
    obs, info = env.reset(seed=seed)
    with isolated_rng(seed):
        actions = batch_actor(agent)([obs] * samples, [info] * samples)
    return sum(env.reward_of(a) for a in actions) / samples


def play_eval_episodes(agent: Any, envs: list[Any], seeds: Sequence[int], mode: str,
                       on_step: Callable[[], None] | None = None) -> list[_Episode]:
    """Play one fresh episode per seed: in lock-step through `batch_actor(agent)` where there is one (one env per
    seed, their programs run concurrently: the sandbox serves several runs at once), otherwise one after another
    through `reset`/`act` on `envs[0]` (an agent may keep per-episode state)."""
    actor = batch_actor(agent)
    if actor is None:
        return [_play_one(as_agent(agent), envs[0], seed, mode, on_step) for seed in seeds]
    agent.reset()
    episodes = [_Episode(seed, mode) for seed in seeds]
    current = [env.reset(seed=seed) for env, seed in zip(envs, seeds)]
    with ThreadPoolExecutor(max_workers=len(envs)) as pool:
        while active := [i for i, episode in enumerate(episodes) if not episode.done]:
            actions = actor([current[i][0] for i in active], [current[i][1] for i in active])
            if len(actions) != len(active):
                raise ValueError(f"act_batch returned {len(actions)} actions for {len(active)} observations")
            for i, (obs, reward, terminated, truncated, info) in zip(
                    active, pool.map(lambda pair: envs[pair[0]].step(pair[1]), zip(active, actions))):
                episodes[i].record(info, reward, terminated, truncated)
                current[i] = (obs, info)
                if on_step is not None:
                    on_step()
    return episodes


def _play_one(agent: Any, env: Any, seed: int, mode: str, on_step: Callable[[], None] | None) -> _Episode:
    episode = _Episode(seed, mode)
    agent.reset()
    obs, info = env.reset(seed=seed)
    while not episode.done:
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        episode.record(info, reward, terminated, truncated)
        if on_step is not None:
            on_step()
    return episode


def evaluate_point(agent: Any, envs: list[Any], scorer: TestScorer, config: BenchConfig, task_name: str, seed: int,
                   point: int, on_step: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """The episodes of evaluation point `point` (an index), each with its final program scored on test."""
    seeds = [eval_seed(task_name, seed, point, k) for k in range(config.eval_episodes)]
    with isolated_rng(seeds[0]):
        episodes = play_eval_episodes(agent, envs, seeds, config.env.mode, on_step)
    scores = scorer.score_all([e.program for e in episodes])
    return [{"seed": e.seed, "attempts": e.attempts, "success_attempt": e.first_success, "dev_score": e.dev_score,
             "return": e.episode_return, "program": e.program, **score} for e, score in zip(episodes, scores)]


def point_summary(point: int, env_steps: int, episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One evaluation point: means over its episodes (success: the final program has a test score; first-attempt
    validity: the episode's first program ran; return: the env's reward summed over the episode)."""
    successes = [e for e in episodes if e["test_score"] is not None]
    ran = [e for e in episodes if e["success_attempt"] is not None]
    normalized = [e["normalized"] for e in episodes]
    return {
        "point": point, "env_steps": env_steps,
        "score": sum(e["score"] for e in episodes) / len(episodes),
        "normalized": None if None in normalized else sum(normalized) / len(normalized),
        "success_rate": len(successes) / len(episodes),
        "attempts_to_success": (sum(e["success_attempt"] for e in successes) / len(successes)
                                if successes else None),
        "first_attempt_validity": sum(e["success_attempt"] == 1 for e in episodes) / len(episodes),
        "attempts_to_first_run": sum(e["success_attempt"] for e in ran) / len(ran) if ran else None,
        "episode_return": sum(e["return"] for e in episodes) / len(episodes),
        "episodes": episodes,
    }
