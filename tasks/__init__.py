"""Task suite: datasets, leak-free splits, metrics, reference scores and demonstration programs.

import tasks
task = tasks.get("breast_cancer")                 # bundled, offline
task = tasks.Task.from_csv("data.csv", target="label")
evaluation = tasks.evaluate(task, program, sandbox)   # the one evaluator: sandboxed run, scored on the host
"""

from __future__ import annotations

import os

from tasks.evaluation import Evaluation, evaluate
from tasks.loaders import TaskDataMissing
from tasks.registry import DEFAULT_TASK, names
from tasks.registry import spec as _spec
from tasks.splits import SplitProtocol
from tasks.task import DEFAULT_MAX_ROWS, Split, Task

__all__ = [
    "DEFAULT_MAX_ROWS",
    "DEFAULT_TASK",
    "Evaluation",
    "Split",
    "SplitProtocol",
    "Task",
    "TaskDataMissing",
    "evaluate",
    "get",
    "names",
]


def get(
    name: str,
    max_rows: int | None = DEFAULT_MAX_ROWS,
    input_format: str = "pandas",
    *,
    split: SplitProtocol | None = None,
    data_home: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> Task:
    """Load a registered task.

    max_rows: stratified, seeded row cap (None = all rows). input_format: "pandas" (real column names and dtypes)
    or "numpy" (the paper's label-encoded float array). data_home: scikit-learn's cache for OpenML tasks;
    data_dir: the user data directory for Kaggle tasks ($ETPO_DATA_DIR); download: allow fetching OpenML data.
    Raises `TaskDataMissing` (saying how to get the data) when a paper task's files are not on this machine.
    """
    spec = _spec(name)
    if spec.openml_id is not None:
        raw = spec.load(data_home=data_home, download=download)
    elif spec.kaggle is not None:
        raw = spec.load(data_dir=data_dir)
    else:
        raw = spec.load()
    return Task.from_raw(
        name, raw, max_rows=max_rows, input_format=input_format, split=split, suite=spec.suite
    )
