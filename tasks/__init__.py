"""Task suite: datasets, leak-free splits, metrics, reference scores and demonstration programs.

import tasks
task = tasks.get("breast_cancer")                 # bundled, offline
task = tasks.Task.from_csv("data.csv", target="label")
evaluation = tasks.evaluate(task, program, sandbox)   # the one evaluator: sandboxed run, scored on the host
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# Attributes are imported on first use (PEP 562) so that `import tasks.cli` stays light for `etpo --version`.
_LAZY = {
    "Evaluation": "tasks.evaluation",
    "evaluate": "tasks.evaluation",
    "TaskDataMissing": "tasks.loaders",
    "DEFAULT_TASK": "tasks.registry",
    "names": "tasks.registry",
    "SUITES": "tasks.registry",
    "SplitProtocol": "tasks.splits",
    "Split": "tasks.task",
    "Task": "tasks.task",
}
DEFAULT_MAX_ROWS = 2000  # default row cap: one step (5 fits) stays fast on 2 CPU cores

__all__ = sorted([*_LAZY, "get"])

if TYPE_CHECKING:
    from tasks.evaluation import Evaluation, evaluate  # noqa: F401
    from tasks.loaders import TaskDataMissing  # noqa: F401
    from tasks.registry import DEFAULT_TASK, SUITES, names  # noqa: F401
    from tasks.splits import SplitProtocol
    from tasks.task import Split, Task  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


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
    from tasks.registry import spec as registry_spec
    from tasks.task import Task

    spec = registry_spec(name)
    if spec.openml_id is not None:
        raw = spec.load(data_home=data_home, download=download)
    elif spec.kaggle is not None:
        raw = spec.load(data_dir=data_dir)
    else:
        raw = spec.load()
    return Task.from_raw(
        name, raw, max_rows=max_rows, input_format=input_format, split=split, suite=spec.suite
    )
