"""The hard suite's reference: a tidying step followed by the best of four model families tuned by FLAML's CFO search.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.demos import Recipe, render
from tasks.programs import wrap_body
from tasks.reference.grid import BASELINE_NAME, baseline_program

#
# On the hard suite a fixed grid says little: the data must be tidied before any model sees it. The reference there
# is a tidying step (`TIDY`) followed by the best of four model families, each tuned by FLAML's CFO search with a
# fixed number of trials (no time budget, fixed seed, one thread per fit: the same trials on every machine). Every
# trial is a program scored through `tasks.evaluate`, as any other. The evidence of headroom stored beside it is the
# score of `DEFAULT_FOREST`, the plainest demonstration-style program (median imputation, one-hot encoding, a
# default random forest).


if TYPE_CHECKING:
    from sandbox.api import Sandbox
    from tasks.task import Task

SEARCH_SAMPLES = 8  # CFO trials per model family
SEARCH_SEED = 20
HARD_COMMAND = "etpo tasks reference --recompute --suite hard"

DEFAULT_FOREST = Recipe(
    "random_forest",
    (("n_estimators", 100), ("max_depth", None), ("min_samples_leaf", 1)),
    "median",
    "onehot",
    "most_frequent",
    "none",
)

TIDY = '''\
import re

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.pipeline import make_pipeline

NUMBER = re.compile(r"^\\s*[$€£]?\\s*([+-]?[\\d,]*\\.?\\d+)\\s*(%|[A-Za-z][A-Za-z/ ]*)?\\s*$")
DATE = re.compile(r"^\\d{4}-\\d{2}-\\d{2}")


def column_kind(col):
    """number, text_number, date, text, identifier or category, judged on the rows seen in fit."""
    if pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        return "number"
    values = col.dropna().astype(str)
    if values.empty:
        return "category"
    if values.str.match(DATE).mean() > 0.95:
        return "date"
    if values.str.fullmatch(NUMBER).mean() > 0.95:
        return "text_number"
    distinct = normalise(col).nunique() / len(values)
    if distinct > 0.5 and values.str.split().str.len().mean() >= 2:
        return "text"
    return "identifier" if distinct > 0.9 else "category"


def parse_numbers(col):
    digits = col.astype(str).str.extract(NUMBER, expand=False)[0].str.replace(",", "", regex=False)
    return pd.to_numeric(digits.where(col.notna()), errors="coerce")


def calendar(col, name):
    stamps = pd.to_datetime(col.astype(str).where(col.notna()), format="ISO8601", errors="coerce")
    return [stamps.dt.year.rename(f"{name}_year"), stamps.dt.month.rename(f"{name}_month"),
            stamps.dt.day_of_week.rename(f"{name}_weekday"),
            (stamps.dt.hour + stamps.dt.minute / 60).rename(f"{name}_hour"),
            (stamps - pd.Timestamp("2000-01-01")).dt.days.rename(f"{name}_days")]


class Tidy(BaseEstimator, TransformerMixin):
    """Numbers written as text become numbers, ISO dates calendar features, free text its length and word count;
    identifiers are dropped; other text becomes frequency-ranked codes (plus indicators of the top levels)."""

    def __init__(self, indicators=0):
        self.indicators = indicators

    def fit(self, X, y=None):
        X = pd.DataFrame(X)
        self.kinds_ = {c: column_kind(X[c]) for c in X.columns}
        self.levels_ = {c: normalise(X[c]).value_counts().index.tolist()
                        for c, kind in self.kinds_.items() if kind == "category"}
        return self

    def transform(self, X):
        X = pd.DataFrame(X)
        parts = []
        for c, kind in self.kinds_.items():
            col = X[c]
            if kind == "number":
                parts.append(col.astype(float).rename(c))
            elif kind == "text_number":
                parts.append(parse_numbers(col).rename(c))
            elif kind == "date":
                parts += calendar(col, c)
            elif kind == "text":
                text = col.fillna("").astype(str)
                parts += [text.str.len().rename(f"{c}_chars"), text.str.split().str.len().rename(f"{c}_words")]
            elif kind == "category":
                levels, clean = self.levels_[c], normalise(col)
                parts += [(clean == level).astype(float).rename(f"{c}={level}")
                          for level in levels[: self.indicators]]
                parts.append(clean.map({level: i for i, level in enumerate(levels)}).astype(float).rename(c))
        return pd.concat(parts, axis=1).astype(float).to_numpy()


def normalise(col):
    return col.astype(str).str.strip().str.lower().where(col.notna())

'''


@dataclass(frozen=True)
class SearchFamily:
    """One model family of the search: its estimator, the steps before it, and its CFO space."""

    name: str
    module: str
    cls: str
    fixed: tuple[tuple[str, Any], ...]
    space: Callable[[Any], dict]  # flaml.tune -> {hyperparameter: domain}
    start: dict  # the first trial: scikit-learn's defaults where the space allows
    imputes: bool = True  # median imputation (with missing indicators) before the estimator
    scales: bool = False


FOREST_START = {"n_estimators": 100, "max_features": 0.3, "min_samples_leaf": 1, "class_weight": None}


def _forest_space(tune) -> dict:
    return {
        "n_estimators": tune.lograndint(50, 400),
        "max_features": tune.uniform(0.05, 1.0),
        "min_samples_leaf": tune.lograndint(1, 30),
        "class_weight": tune.choice([None, "balanced_subsample"]),
    }


SEARCH_FAMILIES = (
    SearchFamily(
        "hist_gradient_boosting",
        "sklearn.ensemble",
        "HistGradientBoostingClassifier",
        (("early_stopping", True), ("random_state", 0)),
        lambda tune: {
            "learning_rate": tune.loguniform(0.02, 0.3),
            "max_leaf_nodes": tune.lograndint(4, 64),
            "min_samples_leaf": tune.lograndint(5, 100),
            "l2_regularization": tune.loguniform(1e-3, 10.0),
            "max_iter": tune.lograndint(50, 300),
        },
        {"learning_rate": 0.1, "max_leaf_nodes": 31, "min_samples_leaf": 20, "l2_regularization": 0.001,
         "max_iter": 100},
        imputes=False,
    ),
    SearchFamily(
        "random_forest",
        "sklearn.ensemble",
        "RandomForestClassifier",
        (("random_state", 0),),
        _forest_space,
        FOREST_START,
    ),
    SearchFamily(
        "extra_trees",
        "sklearn.ensemble",
        "ExtraTreesClassifier",
        (("random_state", 0),),
        _forest_space,
        FOREST_START,
    ),
    SearchFamily(
        "logistic_regression",
        "sklearn.linear_model",
        "LogisticRegression",
        (("max_iter", 3000),),
        lambda tune: {
            "C": tune.loguniform(1e-3, 1e4),
            "indicators": tune.randint(0, 40),
            "class_weight": tune.choice([None, "balanced"]),
        },
        {"C": 1.0, "indicators": 10, "class_weight": None},
        scales=True,
    ),
)
SEARCH_BY_NAME = {family.name: family for family in SEARCH_FAMILIES}


def _plain(value: Any) -> Any:
    """Numbers from the search space as plain Python numbers (rounded floats read well in a program)."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(f"{float(value):.4g}")


def search_program(family_name: str, config: dict) -> str:
    """The program of one search trial: TIDY, imputation/scaling as the family needs, the estimator."""
    family = SEARCH_BY_NAME[family_name]
    config = {key: _plain(value) for key, value in sorted(config.items())}
    indicators = config.pop("indicators", 0)
    args = ", ".join(f"{k}={v!r}" for k, v in [*config.items(), *family.fixed])
    steps = [f"Tidy(indicators={indicators})"]
    imports = [f"from {family.module} import {family.cls}"]
    if family.imputes:
        steps.append('SimpleImputer(strategy="median", add_indicator=True)')
        imports.append("from sklearn.impute import SimpleImputer")
    if family.scales:
        steps.append("StandardScaler()")
        imports.append("from sklearn.preprocessing import StandardScaler")
    body = TIDY + "\n".join(imports) + "\n\n" + (
        f"model = make_pipeline({', '.join(steps)}, {family.cls}({args}))\nmodel.fit(X, y)\nreturn model\n"
    )
    return wrap_body(body)


def default_forest_program() -> str:
    return wrap_body(render(DEFAULT_FOREST))


def _import_tune():
    """flaml.tune, without the warning flaml's package import gives when its AutoML extra is absent."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flaml import tune
    logging.getLogger("flaml").setLevel(logging.ERROR)
    return tune


def search_family(task: Task, sandbox: Sandbox, family_name: str, samples: int = SEARCH_SAMPLES, seed: int = 0) -> dict:
    """CFO over one family: {"score": best dev score, "config": its hyperparameters, "trials": scores in order}."""
    tune = _import_tune()
    family = SEARCH_BY_NAME[family_name]
    from tasks.evaluation import evaluate

    trials: list[float] = []

    def objective(config: dict) -> dict:
        run = evaluate(task, search_program(family_name, config), sandbox, "dev", seed)
        trials.append(run.score if run.score is not None else float("nan"))
        return {"auc": run.score if run.score is not None else 0.0}

    analysis = tune.run(
        objective,
        config=family.space(tune),
        points_to_evaluate=[family.start],
        metric="auc",
        mode="max",
        num_samples=samples,
        search_alg="CFO",
        cost_attr=None,
        verbose=0,
    )
    best = analysis.best_config
    return {
        "score": analysis.best_result["auc"],
        "config": {key: _plain(value) for key, value in best.items()},
        "trials": [None if np.isnan(t) else t for t in trials],
    }


def compute_searched(task: Task, sandbox: Sandbox, seed: int = 0, workers: int = 1, samples: int = SEARCH_SAMPLES) -> dict:
    """The hard-suite entry: baseline, default forest and the searched reference on dev, their test scores, and
    the headroom (the default forest's normalized dev score)."""
    from tasks.evaluation import evaluate

    # One search at a time: flaml.tune keeps its run state in module globals.
    found = {family.name: search_family(task, sandbox, family.name, samples, seed) for family in SEARCH_FAMILIES}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        fixed = {BASELINE_NAME: baseline_program(), "default_forest": default_forest_program()}
        runs = dict(zip(fixed, pool.map(lambda p: evaluate(task, p, sandbox, "dev", seed), fixed.values())))
    if any(run.score is None for run in runs.values()):
        raise RuntimeError(f"baseline or default forest failed on {task.name}: "
                           + "; ".join(f"{n}: {r.result.message}" for n, r in runs.items() if r.score is None))
    best = max(found, key=lambda name: found[name]["score"])
    best_program = search_program(best, found[best]["config"])
    test = {name: evaluate(task, program, sandbox, "test").score
            for name, program in {**fixed, "reference": best_program}.items()}
    baseline, reference, forest = runs[BASELINE_NAME].score, found[best]["score"], runs["default_forest"].score
    return {
        "dev": {
            "baseline": baseline,
            "reference": reference,
            "best": best,
            "config": found[best]["config"],
            "search": found,
            "default_forest": forest,
        },
        "test": {"baseline": test[BASELINE_NAME], "reference": test["reference"], "best": best,
                 "default_forest": test["default_forest"]},
        "headroom": {"default_forest_normalized": (forest - baseline) / (reference - baseline)},
    }
