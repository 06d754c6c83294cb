"""Prompts: the task prompt at reset and the feedback prompts after each attempt.

Every observation is self-contained (task, previous attempt, request), so a plain completion model needs no
history; `as_messages` gives the same text in chat form for instruct models.

Two styles:
- ``"paper"`` follows the shape of the ETPO paper's data-science prompt (arXiv 2402.06700): a role line, the
  dataset described by its shape only (no column names or semantics, so a model cannot lean on memorised
  facts about a famous dataset), the function to write, the metric, and the function header to complete.
- ``"rich"`` adds the task's description, target, class names and the feature table (name, dtype, missing
  count, example values).
"""

from __future__ import annotations

from typing import Any

from etpo_env.program import ENTRY_POINT

STYLES = ("paper", "rich")
SYSTEM_PROMPT = (
    "You are an expert data scientist who writes correct, efficient Python with numpy, pandas, scipy and "
    "scikit-learn. Reply with Python code only."
)
FUNCTION_HEADER = f"def {ENTRY_POINT}(X, y):"
_TRACEBACK_LINES = 25  # tail of the traceback shown to the agent; the last frames carry the cause


def initial_prompt(task: Any, style: str = "paper") -> str:
    """The prompt at reset: the task and the function to write, ending with the function header."""
    return "\n\n".join([_task_section(task, style), _REQUEST, FUNCTION_HEADER])


def fix_prompt(task: Any, style: str, program: str, step_info: dict[str, Any], attempts_left: int) -> str:
    """After a failed attempt: the error, the failing code, and a request to fix it."""
    return "\n\n".join(
        [
            _task_section(task, style),
            _REQUEST,
            "Your previous code failed.\n" + _error_block(step_info),
            "The failing code:\n" + _fenced(program),
            f"Fix the error and reply with the corrected code ({_attempts(attempts_left)}).",
            FUNCTION_HEADER,
        ]
    )


def refine_prompt(
    task: Any,
    style: str,
    best_program: str,
    best_score: float,
    step_info: dict[str, Any],
    attempts_left: int,
) -> str:
    """Refine mode, once a program has run: its score, the best program so far, and a request to improve."""
    if step_info.get("status") == "ok":
        last = f"Your last program scored {_score(step_info['score'])}."
    else:
        last = "Your last program failed.\n" + _error_block(step_info)
    return "\n\n".join(
        [
            _task_section(task, style),
            _REQUEST,
            last,
            f"Your best program so far scored {_score(best_score)}:\n" + _fenced(best_program),
            f"Improve it to reach a higher ROC AUC ({_attempts(attempts_left)}).",
            FUNCTION_HEADER,
        ]
    )


def as_messages(observation: str) -> list[dict[str, str]]:
    """The observation as chat messages (system + user) for instruct models."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": observation}]


def _task_section(task: Any, style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"prompt_style must be one of {STYLES}, got {style!r}")
    kind = "binary" if task.n_classes == 2 else f"{task.n_classes}-class"
    role = f"You are a data scientist. Your task is {kind} classification on a tabular dataset."
    return role + "\n" + task.describe(style=style)  # paper: shape only; rich: names, dtypes, examples


_REQUEST = (
    f"Write the Python function `{ENTRY_POINT}(X, y)`: train a classifier on X and y and return the fitted "
    "model. Its `predict_proba(X_new)` must give one row per sample and one column per class (0..K-1) for "
    "new rows of the same format. The model is scored by ROC AUC on held-out rows; code that fails to run "
    "earns the lowest reward. You may import numpy, pandas, scipy and scikit-learn."
)


def _error_block(step_info: dict[str, Any]) -> str:
    error = step_info.get("error_type") or step_info.get("status", "error")
    lines = [f"{error}: {step_info.get('message', '').strip()}"]
    traceback = (step_info.get("traceback") or "").strip()
    if traceback:
        lines.append("Traceback (last lines):\n" + "\n".join(traceback.splitlines()[-_TRACEBACK_LINES:]))
    return "\n".join(lines)


def _fenced(program: str) -> str:
    fence = "````" if "```" in program else "```"  # a longer fence keeps a program that holds ``` intact
    return f"{fence}python\n{program.rstrip()}\n{fence}"


def _score(score: float) -> str:
    return f"ROC AUC {score:.4f}"


def _attempts(attempts_left: int) -> str:
    return f"{attempts_left} attempt{'s' if attempts_left != 1 else ''} left"
