"""`DataSciCode-v0`: an agent writes `build_model(X, y)`, a sandbox runs it, the reward is the ROC AUC it earns.

One episode is one task. Each step takes the agent's code (a function body, a whole program, or a fenced
block), runs it on the task's dev splits through `tasks.evaluate`, and answers with a feedback prompt:
after an error, the error and the failing code with a request to fix it; in refine mode, the score and the
best program so far with a request to improve it.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym

from etpo_env import prompts
from etpo_env.program import check_action, extract_program
from etpo_env.spaces import MAX_ACTION_CHARS, MAX_OBSERVATION_CHARS, code_text_space, sanitize

MODES = ("fix", "refine")
REWARDS = ("metric", "normalized", "improvement")
INVALID_ACTION = "invalid_action"  # status of an action that was never run (empty, binary, oversized)
_TAIL_CHARS = 2_000  # stdout/stderr tails kept in info
CHANCE_ROC_AUC = 0.5  # improvement floor for a task without a stored baseline score


class DataSciCodeEnv(gym.Env[str, str]):
    """Multi-step data-science coding environment scored in a sandbox.

    Args:
        task: a task name from `tasks.names()` or a `tasks.Task` (default: `tasks.DEFAULT_TASK`).
        sandbox: a backend name for `sandbox.make_sandbox` (`"auto"`, `"docker"`, `"local"`,
            `"unsafe-process"`), created at the first `reset` and closed by `close`; or a shared sandbox
            instance (e.g. a `SandboxPool`), which the env uses but never closes.
        max_attempts: programs per episode (5, as the ETPO paper).
        mode: ``"fix"`` ends the episode at the first program that runs (as the paper); ``"refine"`` keeps
            asking for a better program until the attempts are used up.
        reward: ``"metric"`` is the mean dev ROC AUC, ``failure_reward`` (-1, as the paper) on failure;
            ``"normalized"`` is `task.normalize(score)` (0 = baseline, 1 = reference; needs the task's stored
            scores); ``"improvement"`` is how much the step raised the best score so far, starting from the
            task's baseline score (0.5, chance, when none is stored), so an episode's successful steps sum to
            best score minus baseline.
        prompt_style: ``"paper"`` (dataset shape only, as the ETPO paper) or ``"rich"`` (feature table).
        input_format: ``"pandas"`` or ``"numpy"``: what `X` is inside `build_model` (task names only).
        limits: `sandbox.Limits` for a sandbox the env creates (not allowed with a sandbox instance).
        max_rows: row cap when loading a task by name.
        split_seed: seed of the dev splits; an int keeps rewards comparable across episodes, None draws a
            new seed from the env's generator at every reset.
        failure_reward: reward of a failed step (a program that does not run, or an invalid action).
        max_action_chars: longer actions are failed steps and are not run.
        record_timings: add `duration_s` and `peak_memory_mb` to `info` (off by default: they differ between
            identical runs, and `check_env` requires reproducible `info`).
        render_mode: None or ``"ansi"`` (the last program and its result as text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # ansi frames are not timed; fps keeps checkers quiet

    def __init__(
        self,
        task: Any = None,
        sandbox: Any = "auto",
        max_attempts: int = 5,
        mode: str = "fix",
        reward: str = "metric",
        prompt_style: str = "paper",
        input_format: str = "pandas",
        limits: Any = None,
        max_rows: int = 2000,
        split_seed: int | None = 0,
        failure_reward: float = -1.0,
        max_action_chars: int = MAX_ACTION_CHARS,
        record_timings: bool = False,
        render_mode: str | None = None,
    ):
        _check_choice("mode", mode, MODES)
        _check_choice("reward", reward, REWARDS)
        _check_choice("prompt_style", prompt_style, prompts.STYLES)
        _check_choice("input_format", input_format, ("pandas", "numpy"))
        _check_choice("render_mode", render_mode, (None, *self.metadata["render_modes"]))
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if limits is not None and not isinstance(sandbox, str):
            raise ValueError("limits apply to a sandbox the env creates; set them on the shared sandbox instead")

        self.task = _load_task(task, max_rows=max_rows, input_format=input_format)
        if reward == "normalized" and self.task.normalize(1.0) is None:
            raise ValueError(
                f"task {self.task.name!r} has no baseline/reference scores for this setting, so reward='normalized' "
                "is undefined; use reward='metric' or 'improvement'"
            )
        self.max_attempts = int(max_attempts)
        self.mode = mode
        self.reward_kind = reward
        self.prompt_style = prompt_style
        self.split_seed = split_seed
        self.failure_reward = float(failure_reward)
        self.max_action_chars = int(max_action_chars)
        self.record_timings = record_timings
        self.render_mode = render_mode
        self.observation_space = code_text_space(MAX_OBSERVATION_CHARS)
        self.action_space = code_text_space(self.max_action_chars)

        self._sandbox_spec = sandbox
        self._limits = limits
        self._sandbox: Any = None if isinstance(sandbox, str) else sandbox
        self._owns_sandbox = isinstance(sandbox, str)
        self._reset_episode()
        self._episode_seed = split_seed

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        self._ensure_sandbox()
        self._reset_episode()
        self._episode_seed = (
            self.split_seed if self.split_seed is not None else int(self.np_random.integers(2**31 - 1))
        )
        self._observation = self._sanitize(prompts.initial_prompt(self.task, self.prompt_style))
        info = {
            "task": self.task.name,
            "mode": self.mode,
            "attempt": 0,
            "max_attempts": self.max_attempts,
            "best_score": None,
            "best_program": None,
            "messages": prompts.as_messages(self._observation),
        }
        return self._observation, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        problem = check_action(action, self.max_action_chars)  # raises TypeError for a non-str action
        if self._observation is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset() before step()")
        self._attempt += 1
        if problem is None:
            program = extract_program(action)
            step_info = self._run(program)
        else:
            program = ""
            step_info = _invalid_action_info(problem)

        reward = self._reward(step_info)
        if step_info["status"] == "ok" and (self._best_score is None or step_info["score"] > self._best_score):
            self._best_score, self._best_program = step_info["score"], program
        ran = step_info["status"] == "ok"
        terminated = self._attempt >= self.max_attempts or (self.mode == "fix" and ran)
        self._done = terminated
        self._observation = self._sanitize(self._feedback(program, step_info))
        self._last = {"action": action, "program": program, "reward": reward, **step_info}

        info = {
            **step_info,
            "attempt": self._attempt,
            "best_score": self._best_score,
            "best_program": self._best_program,
            "program": program,
            "messages": prompts.as_messages(self._observation),
        }
        return self._observation, reward, terminated, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._last is None:
            return self._observation or ""
        last = self._last
        result = f"status: {last['status']}"
        if last["status"] == "ok":
            result += f"  score: {last['score']:.4f}  splits: {', '.join(f'{s:.4f}' for s in last['split_scores'])}"
        else:
            result += f"  {last['error_type'] or ''}: {last['message']}"
        best = "none" if self._best_score is None else f"{self._best_score:.4f}"
        return (
            f"--- {self.task.name} attempt {self._attempt}/{self.max_attempts} ({self.mode}) ---\n"
            f"{last['program'].rstrip() or '(no program: ' + last['message'] + ')'}\n"
            f"--- {result}\n--- reward: {last['reward']:+.4f}  best: {best}\n"
        )

    def close(self) -> None:
        sandbox, self._sandbox = self._sandbox, None
        if self._owns_sandbox and sandbox is not None:
            sandbox.close()
        super().close()

    # ------------------------------------------------------------------ read-only state
    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def best_score(self) -> float | None:
        return self._best_score

    @property
    def best_program(self) -> str | None:
        return self._best_program

    @property
    def sandbox(self) -> Any:
        """The sandbox in use (None before the first reset when the env creates its own)."""
        return self._sandbox

    # ------------------------------------------------------------------ internals
    def _reset_episode(self) -> None:
        self._attempt = 0
        self._done = False
        self._best_score: float | None = None
        self._best_program: str | None = None
        self._observation: str | None = None
        self._last: dict[str, Any] | None = None

    def _ensure_sandbox(self) -> None:
        if self._sandbox is None:
            from sandbox import make_sandbox

            self._sandbox = make_sandbox(self._sandbox_spec, limits=self._limits)

    def _run(self, program: str) -> dict[str, Any]:
        """Score `program` on the dev splits. `tasks.evaluate` reports whatever the program does as a status;
        an exception from it is a bug or a misconfiguration on the host and is not hidden."""
        import tasks

        evaluation = tasks.evaluate(self.task, program, self._sandbox, part="dev", seed=self._episode_seed)
        result = evaluation.result
        status = getattr(evaluation.status, "value", str(evaluation.status))
        score = evaluation.score
        if status == "ok" and (score is None or not math.isfinite(score)):
            status = "invalid_output"  # defensive: a run without a usable score is not a success
        info = {
            "status": status,
            "error_type": result.error_type,
            "message": result.message,
            "traceback": result.traceback,
            "stdout": result.stdout[-_TAIL_CHARS:],
            "stderr": result.stderr[-_TAIL_CHARS:],
            "split_scores": [float(s) for s in evaluation.split_scores] if status == "ok" else [],
            "score": float(score) if status == "ok" else None,
            "normalized_score": _float_or_none(evaluation.normalized) if status == "ok" else None,
            "isolation": result.isolation,
        }
        if self.record_timings:
            info["duration_s"] = float(result.duration_s)
            info["peak_memory_mb"] = float(result.peak_memory_mb)
        return info

    def _reward(self, step_info: dict[str, Any]) -> float:
        if step_info["status"] != "ok":
            return self.failure_reward
        if self.reward_kind == "metric":
            return float(step_info["score"])
        if self.reward_kind == "normalized":
            return float(step_info["normalized_score"])
        return float(max(step_info["score"] - self._improvement_floor(), 0.0))

    def _improvement_floor(self) -> float:
        """The score a step must beat to earn an improvement reward: the best so far, else the baseline."""
        if self._best_score is not None:
            return self._best_score
        baseline = self.task.baseline_score
        return float(baseline) if baseline is not None else CHANCE_ROC_AUC

    def _feedback(self, program: str, step_info: dict[str, Any]) -> str:
        attempts_left = self.max_attempts - self._attempt
        if self._best_program is not None and (self.mode == "refine" or step_info["status"] == "ok"):
            return prompts.refine_prompt(
                self.task, self.prompt_style, self._best_program, self._best_score, step_info, attempts_left
            )
        return prompts.fix_prompt(self.task, self.prompt_style, program, step_info, attempts_left)

    def _sanitize(self, text: str) -> str:
        return sanitize(text, self.observation_space.max_length)


def _invalid_action_info(message: str) -> dict[str, Any]:
    return {
        "status": INVALID_ACTION,
        "error_type": None,
        "message": message,
        "traceback": "",
        "stdout": "",
        "stderr": "",
        "split_scores": [],
        "score": None,
        "normalized_score": None,
        "isolation": "",
    }


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _load_task(task: Any, max_rows: int, input_format: str) -> Any:
    import tasks

    if task is None:
        task = tasks.DEFAULT_TASK
    if isinstance(task, str):
        return tasks.get(task, max_rows=max_rows, input_format=input_format)
    return task


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
