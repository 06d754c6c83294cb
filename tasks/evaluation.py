"""`evaluate`: THE evaluator. Builds the job from a task's splits, runs it in a sandbox, scores on the host.

The sandbox side receives features and training labels only; the labels of the scored rows never leave this
process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.metrics import ScoringError

if TYPE_CHECKING:
    from sandbox.api import RunResult, Sandbox, Status
    from tasks.task import Task


@dataclass
class Evaluation:
    status: Status
    score: float | None  # mean over splits; None unless every split scored
    split_scores: list[float]
    normalized: float | None  # task.normalize(score) for the evaluated part; None without reference scores
    result: RunResult  # the sandbox's result (status/message rewritten when the predictions cannot be scored)

    @property
    def ok(self) -> bool:
        return self.score is not None


def evaluate(task: Task, program: str, sandbox: Sandbox, part: str = "dev", seed: int = 0) -> Evaluation:
    """Run `program` on the task's dev splits (seeded) or its test split, in `sandbox`, and score it.

    Never raises for anything the program does: failures come back as a non-OK status with the sandbox's message.
    """
    from sandbox.api import Job, Status

    if part == "dev":
        splits = task.dev_splits(seed=seed)
    elif part == "test":
        splits = [task.test_split()]
    else:
        raise ValueError(f"part must be 'dev' or 'test', got {part!r}")
    job = Job(program=program, folds=[split.fold() for split in splits])
    result = sandbox.run(job)
    if result.status is not Status.OK:
        return Evaluation(result.status, None, [], None, result)
    predictions = result.predictions or []
    if len(predictions) != len(splits):
        return _unscorable(result, f"expected predictions for {len(splits)} folds, got {len(predictions)}.")
    try:
        split_scores = [task.score(split.y_eval, proba) for split, proba in zip(splits, predictions)]
    except ScoringError as exc:
        return _unscorable(result, str(exc))
    score = float(np.mean(split_scores))
    return Evaluation(Status.OK, score, split_scores, task.normalize(score, part=part), result)


def _unscorable(result, message: str) -> Evaluation:
    from sandbox.api import Status

    result = dataclasses.replace(
        result, status=Status.INVALID_OUTPUT, message=message, error_type="InvalidOutput"
    )
    return Evaluation(Status.INVALID_OUTPUT, None, [], None, result)
