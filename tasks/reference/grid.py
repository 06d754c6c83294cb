"""The baseline and the grid reference: the majority-class predictor, and the best of a fixed grid of standard
scikit-learn pipelines on dev (its test score is the dev-best pipeline's).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tasks.demos import Recipe, render
from tasks.programs import wrap_body

if TYPE_CHECKING:
    from sandbox.api import Sandbox
    from tasks.task import Task

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



def compute(task: Task, sandbox: Sandbox, seed: int = 0, workers: int = 1) -> dict:
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
