"""Demonstration programs: a deterministic corpus of `build_model` bodies for SFT and for the tiny model.

A valid body is one point of the grid imputation x categorical handling x scaling x model family x
hyperparameters; every valid body runs on any task of the suite (pandas or numpy input, categorical columns,
missing values). Buggy bodies are realistic mistakes made on top of a valid one: a wrong import, a misspelt class,
a missing fit or return, a wrong keyword argument, a syntax error, or a NaN-intolerant model without imputation
(which fails only on data with missing values).

    from tasks import demos
    for demo in demos.corpus(n=2000, seed=0, buggy_fraction=0.2):
        demo.body, demo.program, demo.family, demo.bug
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from tasks.programs import wrap_body

# --- the grid ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    cls: str
    module: str
    grid: dict[str, tuple]  # hyperparameter -> values (one body per combination)
    fixed: tuple[tuple[str, Any], ...] = ()  # arguments every body of the family passes
    handles_nan: bool = False  # fits on data with missing values without imputation
    wrong_arguments: dict[str, str] = field(default_factory=dict)  # realistic mistaken names for keywords


FAMILIES = [
    Family(
        "logistic_regression",
        "LogisticRegression",
        "sklearn.linear_model",
        {"C": (0.1, 1.0, 10.0), "class_weight": (None, "balanced")},
        (("max_iter", 1000),),
        wrong_arguments={"C": "c", "class_weight": "class_weights"},
    ),
    Family(
        "sgd",
        "SGDClassifier",
        "sklearn.linear_model",
        {"alpha": (1e-4, 1e-3, 1e-2)},
        (("loss", "log_loss"), ("max_iter", 2000), ("random_state", 0)),
        wrong_arguments={"alpha": "lambda_"},
    ),
    Family(
        "knn",
        "KNeighborsClassifier",
        "sklearn.neighbors",
        {"n_neighbors": (5, 15, 31), "weights": ("uniform", "distance")},
        wrong_arguments={"n_neighbors": "k", "weights": "weighting"},
    ),
    Family(
        "svm",
        "SVC",
        "sklearn.svm",
        {"C": (0.5, 1.0, 4.0)},
        (("probability", True), ("random_state", 0)),
        wrong_arguments={"C": "c"},
    ),
    Family(
        "decision_tree",
        "DecisionTreeClassifier",
        "sklearn.tree",
        {"max_depth": (3, 5, 8), "min_samples_leaf": (1, 5, 20)},
        (("random_state", 0),),
        wrong_arguments={"max_depth": "depth", "min_samples_leaf": "min_leaf_size"},
    ),
    Family(
        "random_forest",
        "RandomForestClassifier",
        "sklearn.ensemble",
        {"n_estimators": (100, 200), "max_depth": (None, 8), "min_samples_leaf": (1, 3)},
        (("random_state", 0),),
        wrong_arguments={"n_estimators": "n_estimator", "max_depth": "max_depths"},
    ),
    Family(
        "extra_trees",
        "ExtraTreesClassifier",
        "sklearn.ensemble",
        {"n_estimators": (100, 200), "max_depth": (None, 8), "min_samples_leaf": (1, 3)},
        (("random_state", 0),),
        wrong_arguments={"n_estimators": "num_trees", "max_depth": "depth"},
    ),
    Family(
        "gradient_boosting",
        "GradientBoostingClassifier",
        "sklearn.ensemble",
        {"n_estimators": (50, 100), "learning_rate": (0.05, 0.1), "max_depth": (2, 3)},
        (("random_state", 0),),
        wrong_arguments={"n_estimators": "n_rounds", "learning_rate": "lr"},
    ),
    Family(
        "hist_gradient_boosting",
        "HistGradientBoostingClassifier",
        "sklearn.ensemble",
        {"learning_rate": (0.05, 0.1), "max_iter": (100, 200), "max_leaf_nodes": (15, 31)},
        (("random_state", 0),),
        handles_nan=True,
        wrong_arguments={"learning_rate": "eta", "max_iter": "n_estimators"},
    ),
    Family(
        "naive_bayes",
        "GaussianNB",
        "sklearn.naive_bayes",
        {"var_smoothing": (1e-9, 1e-8, 1e-7)},
        wrong_arguments={"var_smoothing": "smoothing"},
    ),
    Family(
        "mlp",
        "MLPClassifier",
        "sklearn.neural_network",
        {"hidden_layer_sizes": ((32,), (64,), (64, 32)), "alpha": (1e-4, 1e-2)},
        (("max_iter", 500), ("random_state", 0)),
        wrong_arguments={"hidden_layer_sizes": "hidden_layers", "alpha": "l2"},
    ),
    Family(
        "lda",
        "LinearDiscriminantAnalysis",
        "sklearn.discriminant_analysis",
        {"shrinkage": ("auto", 0.1, 0.5)},
        (("solver", "lsqr"),),
        wrong_arguments={"shrinkage": "shrink"},
    ),
    Family(
        "adaboost",
        "AdaBoostClassifier",
        "sklearn.ensemble",
        {"n_estimators": (50, 100), "learning_rate": (0.5, 1.0)},
        (("random_state", 0),),
        wrong_arguments={"n_estimators": "n_learners", "learning_rate": "lr"},
    ),
]
FAMILIES_BY_NAME = {f.name: f for f in FAMILIES}

NUMERIC_IMPUTERS = ("mean", "median", "most_frequent", "constant", "knn", "none")
CATEGORICAL_HANDLING = ("onehot", "ordinal", "drop")
CATEGORICAL_FILL = ("most_frequent", "constant")
SCALERS = ("none", "standard", "minmax", "robust")
SCALER_CLASSES = {"standard": "StandardScaler", "minmax": "MinMaxScaler", "robust": "RobustScaler"}

BUG_KINDS = (
    "wrong_import",
    "misspelt_class",
    "missing_fit",
    "missing_return",
    "wrong_argument",
    "syntax_error",
    "nan_intolerant",
)

# How each bug shows up: the sandbox's status value (a missing return hands back None, which has no predict_proba).
EXPECTED_FAILURE = {bug: "runtime_error" for bug in BUG_KINDS} | {
    "syntax_error": "syntax_error",
    "missing_return": "invalid_output",
}


@dataclass(frozen=True)
class Recipe:
    """One point of the grid; `render` turns it into a body."""

    family: str
    params: tuple[tuple[str, Any], ...]
    imputer: str
    categorical: str
    categorical_fill: str
    scaler: str


@dataclass(frozen=True)
class Demo:
    body: str
    program: str
    family: str
    bug: str | None
    recipe: Recipe | None = None

    def expected_status(self, task) -> str:
        """The `sandbox.Status` value this program should get on `task` ("ok" when it should run)."""
        if not self.fails_on(task):
            return "ok"
        return EXPECTED_FAILURE[self.bug]

    def fails_on(self, task) -> bool:
        """Whether this body is expected to fail on `task` (NaN-intolerant bodies fail only with missing values)."""
        if self.bug is None:
            return False
        if self.bug == "nan_intolerant":
            return task.has_missing if task.input_format == "numpy" else task.has_numeric_missing
        return True


def _valid_recipes() -> list[Recipe]:
    recipes = []
    for family in FAMILIES:
        keys = list(family.grid)
        for values in itertools.product(*(family.grid[k] for k in keys)):
            params = tuple(zip(keys, values))
            imputers = NUMERIC_IMPUTERS if family.handles_nan else NUMERIC_IMPUTERS[:-1]
            for imputer, categorical, scaler in itertools.product(imputers, CATEGORICAL_HANDLING, SCALERS):
                fills = CATEGORICAL_FILL if categorical != "drop" else CATEGORICAL_FILL[:1]
                for fill in fills:
                    recipes.append(Recipe(family.name, params, imputer, categorical, fill, scaler))
    return recipes


@cache
def valid_recipes() -> tuple[Recipe, ...]:
    """Every valid grid point, in a fixed order."""
    return tuple(_valid_recipes())


# --- rendering ----------------------------------------------------------------------------------------------------


def _call(cls: str, args: list[tuple[str, Any]]) -> str:
    return f"{cls}({', '.join(f'{k}={v!r}' for k, v in args)})"


def _numeric_steps(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(pipeline steps, sklearn names to import) for the numeric columns."""
    steps, names = [], []
    if recipe.imputer == "knn":
        steps.append("KNNImputer(n_neighbors=5)")
        names.append("KNNImputer")
    elif recipe.imputer == "constant":
        steps.append('SimpleImputer(strategy="constant", fill_value=0)')
        names.append("SimpleImputer")
    elif recipe.imputer != "none":
        steps.append(f'SimpleImputer(strategy="{recipe.imputer}")')
        names.append("SimpleImputer")
    if recipe.scaler != "none":
        steps.append(f"{SCALER_CLASSES[recipe.scaler]}()")
        names.append(SCALER_CLASSES[recipe.scaler])
    return steps, names


def _categorical_steps(recipe: Recipe) -> tuple[list[str], list[str]]:
    if recipe.categorical == "drop":
        return [], []
    if recipe.categorical_fill == "constant":
        fill = 'SimpleImputer(strategy="constant", fill_value="missing")'
    else:
        fill = 'SimpleImputer(strategy="most_frequent")'
    if recipe.categorical == "onehot":
        encoder, name = 'OneHotEncoder(handle_unknown="ignore", sparse_output=False)', "OneHotEncoder"
    else:
        encoder, name = (
            'OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)',
            "OrdinalEncoder",
        )
    return [fill, encoder], ["SimpleImputer", name]


_MODULE_OF = {
    "SimpleImputer": "sklearn.impute",
    "KNNImputer": "sklearn.impute",
    "StandardScaler": "sklearn.preprocessing",
    "MinMaxScaler": "sklearn.preprocessing",
    "RobustScaler": "sklearn.preprocessing",
    "OneHotEncoder": "sklearn.preprocessing",
    "OrdinalEncoder": "sklearn.preprocessing",
    "FunctionTransformer": "sklearn.preprocessing",
    "ColumnTransformer": "sklearn.compose",
    "make_column_selector": "sklearn.compose",
    "make_pipeline": "sklearn.pipeline",
}
PIPELINE_NAMES = ("ColumnTransformer", "make_column_selector", "make_pipeline", "FunctionTransformer")

# How a body orders its lines. "grouped": every import at the top, then the pipeline. "local": the classifier
# first, each import right above the line that uses it, so no name has to be remembered across the body (what a
# small model writes most reliably).
LAYOUTS = ("grouped", "local")


def _import_lines(names: set[str] | list[str]) -> list[str]:
    """One `from module import a, b` line per module, modules and names sorted."""
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(_MODULE_OF[name], []).append(name)
    return [f"from {module} import {', '.join(sorted(set(by_module[module])))}" for module in sorted(by_module)]


def _imports(names: set[str], family: Family) -> list[str]:
    return ["import pandas as pd", *_import_lines(names), f"from {family.module} import {family.cls}"]


def render(recipe: Recipe, classifier_args: list[tuple[str, Any]] | None = None, layout: str = "grouped") -> str:
    """The body for `recipe` in `layout` (see `LAYOUTS`). Inputs may be a DataFrame or an array: the pipeline starts
    by making a DataFrame, so the column selectors work either way."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")
    family = FAMILIES_BY_NAME[recipe.family]
    numeric, numeric_names = _numeric_steps(recipe)
    categorical, categorical_names = _categorical_steps(recipe)
    if classifier_args is None:
        chosen = dict(recipe.params)
        classifier_args = [*recipe.params, *((k, v) for k, v in family.fixed if k not in chosen)]
    classifier = f"classifier = {_call(family.cls, classifier_args)}"
    numeric_expr = f"make_pipeline({', '.join(numeric)})" if numeric else '"passthrough"'
    numeric_line = f"numeric = {numeric_expr}"
    columns = ['    ("numeric", numeric, make_column_selector(dtype_include="number")),']
    categorical_line = []
    if categorical:
        categorical_line = [f"categorical = make_pipeline({', '.join(categorical)})"]
        columns.append('    ("categorical", categorical, make_column_selector(dtype_exclude="number")),')
    preprocess = ["preprocess = ColumnTransformer(["] + columns + ["])"]
    tail = ["model = make_pipeline(FunctionTransformer(pd.DataFrame), preprocess, classifier)", "model.fit(X, y)",
            "return model"]
    if layout == "grouped":
        lines = [*_imports({*PIPELINE_NAMES, *numeric_names, *categorical_names}, family), "", numeric_line,
                 *categorical_line, *preprocess, classifier, *tail]
    else:
        lines = [f"from {family.module} import {family.cls}", classifier, "",
                 "import pandas as pd", *_import_lines(PIPELINE_NAMES),
                 *_import_lines(numeric_names), numeric_line,
                 *(_import_lines(categorical_names) + categorical_line if categorical else []),
                 *preprocess, *tail]
    return "\n".join(lines) + "\n"


# --- bugs ---------------------------------------------------------------------------------------------------------


def _misspell(name: str, rng: random.Random) -> str:
    """A plausible typo: a doubled or dropped letter inside the name (never the first letter)."""
    i = rng.randrange(1, len(name) - 1)
    return name[:i] + name[i] + name[i:] if rng.random() < 0.5 else name[:i] + name[i + 1 :]


_WRONG_MODULES = [
    "sklearn.linear_model",
    "sklearn.ensemble",
    "sklearn.svm",
    "sklearn.tree",
    "sklearn.preprocessing",
]


# Families that reject NaN in every supported scikit-learn version (trees gained NaN support in recent releases).
NAN_INTOLERANT = ("logistic_regression", "sgd", "knn", "svm", "naive_bayes", "mlp", "lda")


def render_bug(recipe: Recipe, bug: str, rng: random.Random, layout: str = "grouped") -> tuple[str, str]:
    """(body, family) of a realistic mistake made on top of the valid `recipe`, rendered in `layout`."""
    family = FAMILIES_BY_NAME[recipe.family]
    if bug == "wrong_argument":
        key = rng.choice(sorted(family.wrong_arguments))
        args = [
            (family.wrong_arguments[key] if k == key else k, v) for k, v in [*recipe.params, *family.fixed]
        ]
        return render(recipe, args, layout), family.name
    if bug == "nan_intolerant":
        if recipe.family not in NAN_INTOLERANT:
            recipe = Recipe(
                "logistic_regression", (("C", 1.0),), "none", "onehot", "most_frequent", "standard"
            )
        # No numeric imputer: the numeric columns reach the model with their NaN.
        intolerant = Recipe(
            recipe.family, recipe.params, "none", recipe.categorical, recipe.categorical_fill, recipe.scaler
        )
        return render(intolerant, layout=layout), intolerant.family
    body = render(recipe, layout=layout)
    if bug == "wrong_import":
        wrong = rng.choice([m for m in _WRONG_MODULES if m != family.module])
        body = body.replace(f"from {family.module} import {family.cls}", f"from {wrong} import {family.cls}")
    elif bug == "misspelt_class":
        body = body.replace(f"classifier = {family.cls}(", f"classifier = {_misspell(family.cls, rng)}(")
    elif bug == "missing_fit":
        body = body.replace("model.fit(X, y)\n", "")
    elif bug == "missing_return":
        body = body.replace("return model\n", "")
    elif bug == "syntax_error":
        body = body.replace("preprocess = ColumnTransformer([", "preprocess = ColumnTransformer(", 1)
    else:
        raise ValueError(f"unknown bug kind {bug!r}; known: {BUG_KINDS}")
    return body, family.name


# --- the corpus ---------------------------------------------------------------------------------------------------


def corpus(n: int = 2000, seed: int = 0, buggy_fraction: float = 0.2, layout: str = "grouped") -> list[Demo]:
    """`n` distinct demonstrations (the same list for the same arguments, on every machine).

    `round(n * buggy_fraction)` are buggy, spread evenly over `BUG_KINDS`; the rest are distinct valid grid points.
    `layout` orders each body's lines (`LAYOUTS`); the same arguments give the same programs in either layout.
    """
    if not 0.0 <= buggy_fraction <= 1.0:
        raise ValueError(f"buggy_fraction must be in [0, 1], got {buggy_fraction}")
    recipes = list(valid_recipes())
    n_buggy = round(n * buggy_fraction)
    n_valid = n - n_buggy
    if n_valid > len(recipes):
        raise ValueError(f"at most {len(recipes)} distinct valid demos exist; asked for {n_valid}")
    rng = random.Random(seed)  # Python's Mersenne Twister: the same stream on every platform
    rng.shuffle(recipes)
    demos = [_demo(render(r, layout=layout), r.family, None, r) for r in recipes[:n_valid]]
    seen = {d.body for d in demos}
    attempts = 0
    while len(demos) < n:
        attempts += 1
        if attempts > 50 * max(n_buggy, 1):
            raise ValueError(f"could not draw {n_buggy} distinct buggy demos")
        bug = BUG_KINDS[(len(demos) - n_valid) % len(BUG_KINDS)]
        recipe = rng.choice(recipes)
        body, family = render_bug(recipe, bug, rng, layout)
        if body not in seen:
            seen.add(body)
            demos.append(_demo(body, family, bug, recipe))
    order = list(range(len(demos)))
    rng.shuffle(order)
    return [demos[i] for i in order]


def _demo(body: str, family: str, bug: str | None, recipe: Recipe) -> Demo:
    return Demo(body=body, program=wrap_body(body), family=family, bug=bug, recipe=recipe)


# --- fixes --------------------------------------------------------------------------------------------------------


def buggy_demo(recipe: Recipe, bug: str, rng: random.Random, layout: str = "grouped") -> Demo:
    """The demo of mistake `bug` made on top of the valid `recipe` (its `recipe` is the one it was made from)."""
    body, family = render_bug(recipe, bug, rng, layout)
    return _demo(body, family, bug, recipe)


def safe_recipe(family: str) -> Recipe:
    """The family's plainest program that runs on every task of the suite: the first point of its grid, median
    imputation and standard scaling of the numeric columns, the other columns dropped."""
    spec = FAMILIES_BY_NAME[family]
    params = tuple((k, v[0]) for k, v in spec.grid.items())
    return Recipe(family, params, "median", "drop", "most_frequent", "standard")
