"""Reference scores: a baseline and a strong reference per task, computed through the sandboxed evaluator.

baseline  = the majority-class predictor (ROC AUC 0.5: chance level).
reference = the best dev score over a fixed grid of standard scikit-learn pipelines (`GRID`).
normalized = (score - baseline) / (reference - baseline): 0 at chance, 1 at the best standard pipeline.

On the test part, the reference is the test score of the pipeline that was best on dev (selection never looks at
test labels). Stored in tasks/data/reference_scores.json per split protocol (`tasks.splits.PROTOCOLS`: the default
holdout and the paper's), task, input format and row count; recompute with `etpo tasks reference --recompute
[--protocol paper]`.

Modules: `store` (the JSON store), `grid` (baseline and grid reference), `search` (the hard suite's searched
reference); this package recomputes entries with the right one and reads what a stored entry says.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import sklearn

from tasks.reference.grid import BASELINE_BODY, BASELINE_NAME, GRID, baseline_program, compute, grid_program
from tasks.reference.search import (
    DEFAULT_FOREST,
    HARD_COMMAND,
    SEARCH_BY_NAME,
    SEARCH_FAMILIES,
    SEARCH_SAMPLES,
    SEARCH_SEED,
    TIDY,
    compute_searched,
    default_forest_program,
    search_family,
    search_program,
)
from tasks.reference.store import (
    RECOMPUTE_COMMAND,
    STORE_PATH,
    load_store,
    lookup,
    protocol_name,
    save_store,
    setting_key,
    stored_entry,
)
from tasks.splits import PROTOCOLS

if TYPE_CHECKING:
    from sandbox.api import Sandbox
    from tasks.task import Task


def recompute(task_list: Sequence[Task], sandbox: Sandbox, path: str | os.PathLike | None = None, seed: int = 0,
              workers: int = 1, progress: Callable[[Task, dict], None] | None = None) -> dict:
    """Compute and store the scores of `task_list` (other stored entries are kept). Every task must use one of the
    named protocols (`tasks.splits.PROTOCOLS`)."""
    store = dict(load_store(path))
    store.setdefault("protocols", {})
    store.update(
        {
            "about": "baseline = majority class (chance); reference = best dev score of the GRID pipelines in "
            "tasks/reference/grid.py (hard suite: of the FLAML-searched TIDY pipelines, with the default forest's "
            "score as headroom evidence); test reference = test score of the dev-best pipeline.",
            "hard_command": HARD_COMMAND,
            "command": RECOMPUTE_COMMAND,
            "scikit_learn": sklearn.__version__,
        }
    )
    for task in task_list:
        name = protocol_name(task.split_protocol)
        if name is None:
            raise ValueError(f"reference scores are stored for the named split protocols {sorted(PROTOCOLS)} only")
        protocol = store["protocols"].setdefault(name, {"split": asdict(task.split_protocol), "tasks": {}})
        method = compute_searched if task.suite == "hard" else compute
        entry = method(task, sandbox, seed=seed, workers=workers)
        protocol["tasks"].setdefault(task.name, {})[setting_key(task)] = entry
        save_store(store, path)
        if progress:
            progress(task, entry)
    return store




def headroom(task) -> float | None:
    """The default forest's normalized dev score, stored with the hard suite's references (else None)."""
    entry = stored_entry(task) or {}
    return entry.get("headroom", {}).get("default_forest_normalized")


def reference_program(entry: dict) -> str:
    """The program behind a stored reference: a grid pipeline, or the searched pipeline of a hard task."""
    dev = entry["dev"]
    if "config" in dev:
        return search_program(dev["best"], dev["config"])
    return grid_program(dev["best"])


__all__ = [
    "BASELINE_BODY", "BASELINE_NAME", "DEFAULT_FOREST", "GRID", "HARD_COMMAND", "RECOMPUTE_COMMAND", "SEARCH_BY_NAME",
    "SEARCH_FAMILIES", "SEARCH_SAMPLES", "SEARCH_SEED", "STORE_PATH", "TIDY", "baseline_program", "compute",
    "compute_searched", "default_forest_program", "grid_program", "headroom", "load_store", "lookup", "protocol_name",
    "recompute", "reference_program", "save_store", "search_family", "search_program", "setting_key", "stored_entry",
]
