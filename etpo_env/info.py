"""`StepInfo`: every key of the `info` dict that `DataSciCode-v0` returns, and the one way a status becomes a string.

`reset` returns the episode keys (`task` .. `messages`); `step` returns the step keys, the episode's running state
(`attempt`, `best_score`, `best_program`), the program that ran and the next prompt in chat form. `duration_s` and
`peak_memory_mb` appear only with `record_timings=True`.
"""

from __future__ import annotations

from typing import Any, TypedDict

INVALID_ACTION = "invalid_action"  # status of an action that was never run (empty, binary, oversized)


class StepInfo(TypedDict, total=False):
    # reset (and the running state repeated by step)
    task: str  # the task's name (reset only)
    mode: str  # "fix" or "refine" (reset only)
    max_attempts: int  # programs per episode (reset only)
    attempt: int  # programs run so far in this episode (0 after reset)
    best_score: float | None  # best mean dev score of this episode so far
    best_program: str | None  # the program that reached it
    messages: list[dict[str, str]]  # the observation in chat form (system + user)
    # step: what the program did
    status: str  # "ok", a `sandbox.Status` value (runtime_error, timeout, ...) or "invalid_action"
    error_type: str | None  # exception class name raised by the program, if any
    message: str  # one-line explanation of a failure ("" on success)
    traceback: str  # the program's traceback, if any
    stdout: str  # tail of the program's stdout
    stderr: str  # tail of the program's stderr
    split_scores: list[float]  # metric per dev split (empty on failure)
    score: float | None  # mean dev score (None on failure)
    normalized_score: float | None  # task.normalize(score): 0 = baseline, 1 = reference (None when undefined)
    isolation: str  # the sandbox isolation the run got ("" for an action that never ran)
    program: str  # the program extracted from the action ("" for an invalid action)
    duration_s: float  # wall time of the run (record_timings only)
    peak_memory_mb: float  # peak memory of the run (record_timings only)


EPISODE_KEYS = ("task", "mode", "attempt", "max_attempts", "best_score", "best_program", "messages")
RESULT_KEYS = ("status", "error_type", "message", "traceback", "stdout", "stderr", "split_scores", "score",
               "normalized_score", "isolation")
TIMING_KEYS = ("duration_s", "peak_memory_mb")
# What the episode recorder keeps of a step (long or repeated fields, the prompt and the program, stay out).
RECORD_KEYS = (*RESULT_KEYS[:-1], "attempt", "best_score", "isolation")
# The small scalars a rollout buffer or a reflection summary keeps per step.
SUMMARY_KEYS = ("status", "score", "normalized_score", "attempt", "error_type")


def status_name(status: Any) -> str:
    """A `sandbox.Status` (or any enum, or a plain string) as the string that `info["status"]` carries."""
    return str(getattr(status, "value", status))
