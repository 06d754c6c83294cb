"""`DataSciCode-v0`: an agent writes `build_model(X, y)`, a sandbox runs it, the reward is the ROC AUC it earns.

One episode is one task. Each step takes the agent's code (a function body, a whole program, or a fenced
block), runs it on the task's dev splits through `tasks.evaluate`, and answers with a feedback prompt:
after an error, the error and the failing code with a request to fix it; in refine mode, the score and the
best program so far with a request to improve it.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import gymnasium as gym

from etpo_env import prompts
from etpo_env.config import MODES, REWARDS, EnvConfig  # noqa: F401  (MODES, REWARDS: re-exported)
from etpo_env.info import INVALID_ACTION, RESULT_KEYS, StepInfo, status_name
from etpo_env.program import check_action, extract_program
from etpo_env.spaces import MAX_OBSERVATION_CHARS, code_text_space, sanitize

logger = logging.getLogger(__name__)
_WARNED_SPLITS: set[tuple[str, str]] = set()  # (task, protocol method) already warned about in this process

_TAIL_CHARS = 2_000  # stdout/stderr tails kept in info
CHANCE_ROC_AUC = 0.5  # improvement floor for a task without a stored baseline score


class DataSciCodeEnv(gym.Env[str, str]):
    """Multi-step data-science coding environment scored in a sandbox.

    Args:
        config: an `EnvConfig` (see its fields for every setting: task, sandbox, max_attempts, mode, reward,
            prompt_style, input_format, limits, max_rows, split_seed, failure_reward, max_action_chars,
            record_timings). A task name or `tasks.Task` here is taken as `task=` (the first argument used to be
            the task).
        render_mode: None or ``"ansi"`` (the last program and its result as text).
        **overrides: `EnvConfig` fields by name; they fill the config (or override the given one), so
            ``gym.make("DataSciCode-v0", task="titanic", mode="refine")`` keeps working.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}  # ansi frames are not timed; fps keeps checkers quiet

    def __init__(self, config: EnvConfig | Any = None, render_mode: str | None = None, **overrides: Any):
        if config is not None and not isinstance(config, EnvConfig):
            overrides = {"task": config, **overrides}
            config = None
        config = (config or EnvConfig()).replace(**overrides) if overrides else (config or EnvConfig())
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {(None, *self.metadata['render_modes'])}, "
                             f"got {render_mode!r}")
        self.config = config
        self.task = _load_task(config.task, config)
        if config.reward == "normalized" and self.task.normalize(1.0) is None:
            raise ValueError(
                f"task {self.task.name!r} has no baseline/reference scores for this setting, so reward='normalized' "
                "is undefined; use reward='metric' or 'improvement'"
            )
        self.max_attempts = int(config.max_attempts)
        self.mode = config.mode
        self.reward_kind = config.reward
        self.prompt_style = config.prompt_style
        self.split_seed = config.split_seed
        self.failure_reward = float(config.failure_reward)
        self.max_action_chars = int(config.max_action_chars)
        self.record_timings = config.record_timings
        self.render_mode = render_mode
        self.observation_space = code_text_space(MAX_OBSERVATION_CHARS)
        self.action_space = code_text_space(self.max_action_chars)

        owns = isinstance(config.sandbox, str)
        self._sandbox: Any = None if owns else config.sandbox
        self._owns_sandbox = owns
        self._prefetch_thread: ThreadPoolExecutor | None = None
        # (program, its running evaluation): begun by prefetch() for the next step of this episode; every step takes
        # it and every reset drops it, so what is found at a step was begun for that step
        self._prefetched: tuple[str, Future] | None = None
        self._reset_episode()
        self._episode_seed = config.split_seed

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, StepInfo]:
        super().reset(seed=seed)
        self._ensure_sandbox()
        self._reset_episode()
        self._episode_seed = (
            self.split_seed if self.split_seed is not None else int(self.np_random.integers(2**31 - 1))
        )
        self._observation = self._sanitize(prompts.initial_prompt(self.task, self.prompt_style))
        info = StepInfo(
            task=self.task.name,
            mode=self.mode,
            attempt=0,
            max_attempts=self.max_attempts,
            best_score=None,
            best_program=None,
            messages=prompts.as_messages(self._observation),
        )
        return self._observation, info

    def step(self, action: str) -> tuple[str, float, bool, bool, StepInfo]:
        problem = check_action(action, self.max_action_chars)  # raises TypeError for a non-str action
        if self._observation is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset() before step()")
        self._attempt += 1
        program = extract_program(action) if problem is None else ""
        prefetched = self._take_prefetched(program if problem is None else None)
        step_info = self._run(program, prefetched) if problem is None else _invalid_action_info(problem)

        reward = self._reward(step_info)
        if step_info["status"] == "ok" and (self._best_score is None or step_info["score"] > self._best_score):
            self._best_score, self._best_program = step_info["score"], program
        ran = step_info["status"] == "ok"
        terminated = self._attempt >= self.max_attempts or (self.mode == "fix" and ran)
        self._done = terminated
        self._observation = self._sanitize(self._feedback(program, step_info))
        self._last = {"action": action, "program": program, "reward": reward, **step_info}

        info = StepInfo(
            **step_info,
            attempt=self._attempt,
            best_score=self._best_score,
            best_program=self._best_program,
            program=program,
            messages=prompts.as_messages(self._observation),
        )
        return self._observation, reward, terminated, False, info

    def prefetch(self, action: str) -> None:
        """Begin running `action`'s program in the background, for a `step(action)` that follows.

        A batch of envs sharing one sandbox (a learner's siblings) can then run their programs side by side on the
        sandbox's slots while each env is still stepped one after another, so everything a step changes — the
        episode, its wrappers' counts and records — happens in the same order as without it. `step` uses the
        result only for the same program in the same episode, and runs the program itself otherwise; the job is
        exactly the one `step` would run (same program, splits and seed), so a prefetched run that is never used
        changes nothing. Not part of the Gymnasium API: an optional speed-up for batched collectors.
        """
        if (not isinstance(action, str) or check_action(action, self.max_action_chars) is not None
                or self._observation is None or self._done):
            return  # step() will not run a program for it (or will raise)
        program = extract_program(action)
        self._drop_prefetched()
        if self._prefetch_thread is None:
            self._prefetch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="etpo-env-prefetch")
        self._prefetched = (program, self._prefetch_thread.submit(self._evaluate, program, self._episode_seed))

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
        self._drop_prefetched()
        if self._prefetch_thread is not None:
            self._prefetch_thread.shutdown(wait=True)  # a running job ends within the sandbox's own time limit
            self._prefetch_thread = None
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
        self._drop_prefetched()
        self._attempt = 0
        self._done = False
        self._best_score: float | None = None
        self._best_program: str | None = None
        self._observation: str | None = None
        self._last: dict[str, Any] | None = None

    def _ensure_sandbox(self) -> None:
        if self._sandbox is None:
            from sandbox import make_sandbox

            self._sandbox = make_sandbox(self.config.sandbox, limits=self.config.limits)

    def _evaluate(self, program: str, seed: Any) -> Any:
        import tasks

        return tasks.evaluate(self.task, program, self._sandbox, part="dev", seed=seed)

    def _take_prefetched(self, program: str | None) -> Future | None:
        """The evaluation prefetched for this step if it runs `program` (None otherwise; it is dropped)."""
        if self._prefetched is not None and self._prefetched[0] == program:
            future, self._prefetched = self._prefetched[1], None
            return future
        self._drop_prefetched()
        return None

    def _drop_prefetched(self) -> None:
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None:
            prefetched[1].cancel()  # a job already running finishes on its own; its result is never read

    def _run(self, program: str, prefetched: Future | None = None) -> StepInfo:
        """Score `program` on the dev splits (or take the prefetched evaluation of it). `tasks.evaluate` reports
        whatever the program does as a status; an exception from it is a bug or a misconfiguration on the host and
        is not hidden."""
        evaluation = prefetched.result() if prefetched is not None else self._evaluate(program, self._episode_seed)
        result = evaluation.result
        status = status_name(evaluation.status)
        score = evaluation.score
        if status == "ok" and (score is None or not math.isfinite(score)):
            status = "invalid_output"  # defensive: a run without a usable score is not a success
        ok = status == "ok"
        info = _result_info(
            status=status,
            error_type=result.error_type,
            message=result.message,
            traceback=result.traceback,
            stdout=result.stdout[-_TAIL_CHARS:],
            stderr=result.stderr[-_TAIL_CHARS:],
            split_scores=[float(s) for s in evaluation.split_scores] if ok else [],
            score=float(score) if ok else None,
            normalized_score=_float_or_none(evaluation.normalized) if ok else None,
            isolation=result.isolation,
        )
        if self.record_timings:
            info["duration_s"] = float(result.duration_s)
            info["peak_memory_mb"] = float(result.peak_memory_mb)
        return info

    def _reward(self, step_info: StepInfo) -> float:
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

    def _feedback(self, program: str, step_info: StepInfo) -> str:
        attempts_left = self.max_attempts - self._attempt
        if self._best_program is not None and (self.mode == "refine" or step_info["status"] == "ok"):
            return prompts.refine_prompt(
                self.task, self.prompt_style, self._best_program, self._best_score, step_info, attempts_left
            )
        return prompts.fix_prompt(self.task, self.prompt_style, program, step_info, attempts_left)

    def _sanitize(self, text: str) -> str:
        return sanitize(text, self.observation_space.max_length)


def _result_info(**values: Any) -> StepInfo:
    """The `RESULT_KEYS` part of a step's info, every key present, in the documented order."""
    if set(values) != set(RESULT_KEYS):
        raise ValueError(f"a step result needs exactly {RESULT_KEYS}, got {sorted(values)}")
    return StepInfo(**{key: values[key] for key in RESULT_KEYS})  # type: ignore[misc]


def _invalid_action_info(message: str) -> StepInfo:
    return _result_info(status=INVALID_ACTION, error_type=None, message=message, traceback="", stdout="", stderr="",
                        split_scores=[], score=None, normalized_score=None, isolation="")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _load_task(task: Any, config: EnvConfig) -> Any:
    import tasks
    from tasks.splits import PROTOCOLS

    if task is None:
        task = tasks.DEFAULT_TASK
    if isinstance(task, str):
        task = tasks.get(
            task, max_rows=config.max_rows, input_format=config.input_format, split=PROTOCOLS[config.split]
        )
    warning = task.split_protocol.channel_warning
    if warning and (task.name, task.split_protocol.method) not in _WARNED_SPLITS:
        # The user chose this protocol; say once per process, where it is chosen, what it gives up.
        _WARNED_SPLITS.add((task.name, task.split_protocol.method))
        logger.warning("task %s: %s", task.name, warning)
    return task

