"""Reference scores: a baseline and a strong reference per task, computed through the sandboxed evaluator.

baseline  = the majority-class predictor (ROC AUC 0.5: chance level).
reference = the best dev score over a fixed grid of standard scikit-learn pipelines (`GRID`).
normalized = (score - baseline) / (reference - baseline): 0 at chance, 1 at the best standard pipeline.

On the test part, the reference is the test score of the pipeline that was best on dev (selection never looks at
test labels). Stored in tasks/data/reference_scores.json per task, input format and row count; recompute with
`etpo tasks reference --recompute`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import cache
from pathlib import Path

import sklearn

from tasks.demos import Recipe, render
from tasks.programs import wrap_body
from tasks.splits import SplitProtocol

STORE_PATH = Path(__file__).parent / "data" / "reference_scores.json"
RECOMPUTE_COMMAND = "etpo tasks reference --recompute"

BASELINE_NAME = "majority"
BASELINE_BODY = """\
from sklearn.dummy import DummyClassifier

model = DummyClassifier(strategy="prior")
model.fit(X, y)
return model
"""

# The fixed grid of standard pipelines (rendered by the same code as the demonstrations).
GRID: dict[str, Recipe] = {
    "logistic_regression": Recipe(
        "logistic_regression",
        (("C", 1.0), ("max_iter", 2000)),
        "median",
        "onehot",
        "most_frequent",
        "standard",
    ),
    "knn": Recipe(
        "knn", (("n_neighbors", 15), ("weights", "distance")), "median", "onehot", "most_frequent", "standard"
    ),
    "svm": Recipe(
        "svm",
        (("C", 1.0), ("probability", True), ("random_state", 0)),
        "median",
        "onehot",
        "most_frequent",
        "standard",
    ),
    "random_forest": Recipe(
        "random_forest",
        (("n_estimators", 300), ("min_samples_leaf", 2), ("random_state", 0)),
        "median",
        "ordinal",
        "most_frequent",
        "none",
    ),
    "extra_trees": Recipe(
        "extra_trees",
        (("n_estimators", 300), ("min_samples_leaf", 2), ("random_state", 0)),
        "median",
        "ordinal",
        "most_frequent",
        "none",
    ),
    "gradient_boosting": Recipe(
        "gradient_boosting",
        (("n_estimators", 100), ("max_depth", 3), ("random_state", 0)),
        "median",
        "ordinal",
        "most_frequent",
        "none",
    ),
    "hist_gradient_boosting": Recipe(
        "hist_gradient_boosting",
        (("max_iter", 200), ("learning_rate", 0.05), ("random_state", 0)),
        "none",
        "ordinal",
        "most_frequent",
        "none",
    ),
}


def grid_program(name: str) -> str:
    recipe = GRID[name]
    return wrap_body(render(recipe, list(recipe.params)))


def baseline_program() -> str:
    return wrap_body(BASELINE_BODY)


# --- the store ----------------------------------------------------------------------------------------------------


def setting_key(task) -> str:
    """Scores depend on the rows (cap) and on the input format; the key records both."""
    return f"{task.input_format}/rows={task.n_rows}"


@cache
def _cached_store(path: str, mtime: float) -> dict:
    with open(path) as f:
        return json.load(f)


def load_store(path: str | os.PathLike | None = None) -> dict:
    path = Path(path or STORE_PATH)
    if not path.exists():
        return {"tasks": {}}
    return _cached_store(str(path), path.stat().st_mtime)


def lookup(task, part: str = "dev") -> dict | None:
    """{"baseline", "reference", "best"} for this task's setting and part, or None if nothing matches."""
    override = getattr(task, "reference_scores", None)
    if override is not None:
        return override.get(part)
    store = load_store()
    if store.get("split") != asdict(task.split_protocol):
        return None
    entry = store["tasks"].get(task.name, {}).get(setting_key(task))
    return entry.get(part) if entry else None


def save_store(store: dict, path: str | os.PathLike | None = None) -> Path:
    path = Path(path or STORE_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    _cached_store.cache_clear()
    return path


# --- computing --------------------------------------------------------------------------------------------------


def compute(task, sandbox, seed: int = 0, workers: int = 1) -> dict:
    """Scores of the baseline and every grid pipeline on the dev splits, then the test scores of the baseline and of
    the dev-best pipeline. All through `tasks.evaluate`. Raises if the baseline or every grid pipeline fails."""
    from tasks.evaluation import evaluate

    programs = {BASELINE_NAME: baseline_program(), **{name: grid_program(name) for name in GRID}}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        runs = dict(
            zip(programs, pool.map(lambda p: evaluate(task, p, sandbox, "dev", seed), programs.values()))
        )
    failures = {
        name: f"{ev.status.value}: {ev.result.message}" for name, ev in runs.items() if ev.score is None
    }
    grid_scores = {name: runs[name].score for name in GRID if runs[name].score is not None}
    if BASELINE_NAME in failures or not grid_scores:
        raise RuntimeError(f"reference programs failed on {task.name}: {failures}")
    best = max(grid_scores, key=grid_scores.get)
    test_baseline = evaluate(task, programs[BASELINE_NAME], sandbox, "test")
    test_best = evaluate(task, programs[best], sandbox, "test")
    return {
        "dev": {
            "baseline": runs[BASELINE_NAME].score,
            "reference": grid_scores[best],
            "best": best,
            "grid": grid_scores,
            "failures": failures,
        },
        "test": {"baseline": test_baseline.score, "reference": test_best.score, "best": best},
    }


def recompute(task_list, sandbox, path=None, seed: int = 0, workers: int = 1, progress=None) -> dict:
    """Compute and store the scores of `task_list` (other stored entries are kept)."""
    store = dict(load_store(path))
    store.setdefault("tasks", {})
    store.update(
        {
            "about": "baseline = majority class (chance); reference = best dev score of the GRID pipelines in "
            "tasks/reference.py; test reference = test score of the dev-best pipeline.",
            "command": RECOMPUTE_COMMAND,
            "split": asdict(SplitProtocol()),
            "scikit_learn": sklearn.__version__,
        }
    )
    for task in task_list:
        if task.split_protocol != SplitProtocol():
            raise ValueError("reference scores are stored for the default split protocol only")
        entry = compute(task, sandbox, seed=seed, workers=workers)
        store["tasks"].setdefault(task.name, {})[setting_key(task)] = entry
        save_store(store, path)
        if progress:
            progress(task, entry)
    return store
