"""The bundled suite, splits, the metric, descriptions and the program template (no sandbox needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import tasks
from tasks import metrics, splits
from tasks.programs import ENTRY_POINT, wrap_body
from tests.fixtures_tasks import load_suite_offline


@pytest.fixture(scope="module")
def bundled():
    """Every bundled task, loaded once with the network blocked (the suite must be fully offline)."""
    return load_suite_offline("bundled")


def tagged_task(n: int = 200, n_classes: int = 2, **kw) -> tasks.Task:
    """A task whose frame carries a unique `row_id`, so tests can see which source rows went where."""
    rng = np.random.RandomState(0)
    frame = pd.DataFrame({"row_id": np.arange(n), "x": rng.normal(size=n)})
    labels = np.sort(np.arange(n) % n_classes)  # sorted by class, as many source files are
    return tasks.Task("tagged", frame, labels, **kw)


# --- the bundled suite -------------------------------------------------------------------------------------------


def test_bundled_suite_is_varied(bundled):
    assert len(bundled) >= 10
    assert tasks.DEFAULT_TASK in bundled
    assert any(t.n_classes == 2 for t in bundled.values())
    assert any(t.n_classes > 2 for t in bundled.values())
    assert any(t.has_categorical for t in bundled.values())
    assert any(not t.has_categorical for t in bundled.values())
    assert any(t.has_missing for t in bundled.values())
    assert any(not t.has_missing for t in bundled.values())
    sizes = [t.source_rows for t in bundled.values()]
    assert min(sizes) >= 150 and max(sizes) <= 10_000 and max(sizes) > 5_000


def test_every_bundled_task_is_well_formed(bundled):
    for name, task in bundled.items():
        assert task.name == name and task.source and task.description
        assert 0 < task.n_rows <= tasks.DEFAULT_MAX_ROWS and task.n_features > 0
        assert sum(task.class_counts.values()) == task.n_rows
        assert min(task.class_counts.values()) > 0
        assert task.n_dev_rows + task.n_test_rows == task.n_rows
        rows = task.scored_rows()
        assert len(rows["fit"]) + len(rows["reward"]) == task.n_dev_rows == task.n_fit_rows + len(rows["reward"])
        (split,) = task.dev_splits()  # one fit on the fitting rows, scored on the reward rows
        assert isinstance(split.X_fit, pd.DataFrame) and list(split.X_fit.columns) == list(split.X_eval.columns)
        assert task.target not in split.X_fit.columns
        assert len(split.X_fit) == len(rows["fit"]) and len(split.X_eval) == len(rows["reward"])
        assert set(np.unique(split.y_fit)) == set(range(task.n_classes))
        assert set(np.unique(split.y_eval)) == set(range(task.n_classes))
        assert isinstance(split.X_eval.index, pd.RangeIndex) and split.X_eval.index.start == 0
        test = task.test_split()
        assert len(test.X_fit) == len(rows["fit"]) and len(test.X_eval) == task.n_test_rows


def test_row_cap_is_stratified_and_seeded():
    full = tasks.get("credit_default", max_rows=None)
    capped = tasks.get("credit_default", max_rows=1000)
    assert full.n_rows == 10_000 and capped.n_rows == 1000
    expected = full.class_counts["Yes"] * 1000 / 10_000
    assert abs(capped.class_counts["Yes"] - expected) <= 1
    again = tasks.get("credit_default", max_rows=1000)
    pd.testing.assert_frame_equal(capped.test_split().X_eval, again.test_split().X_eval)


# --- splits: leak-free and deterministic --------------------------------------------------------------------------


def test_fitting_reward_and_test_rows_are_disjoint_and_cover_all_rows():
    task = tagged_task()
    test_ids = set(task.test_split().X_eval["row_id"])
    fit_ids = set(task.test_split().X_fit["row_id"])
    (reward,) = task.dev_splits(seed=3)
    reward_ids = set(reward.X_eval["row_id"])
    assert set(reward.X_fit["row_id"]) == fit_ids
    assert not test_ids & fit_ids and not reward_ids & fit_ids and not reward_ids & test_ids
    assert len(test_ids | fit_ids | reward_ids) == 200
    assert (len(fit_ids), len(reward_ids), len(test_ids)) == (100, 50, 50)


def test_holdout_resamples_fit_on_fitting_rows_only_and_vary_with_the_seed():
    task = tagged_task(split=tasks.SplitProtocol(n_splits=3, resample_fraction=0.8))
    fit_ids = set(task.test_split().X_fit["row_id"])
    seeded = task.dev_splits(seed=0)
    assert len(seeded) == 3
    reward_ids = set(seeded[0].X_eval["row_id"])
    for split in seeded + task.dev_splits(seed=1):
        assert set(split.X_fit["row_id"]) < fit_ids and len(split.X_fit) == 80
        assert set(split.X_eval["row_id"]) == reward_ids  # every fit is scored on the same reward rows
    assert not seeded[0].X_fit.equals(seeded[1].X_fit)
    assert not seeded[0].X_fit.equals(task.dev_splits(seed=1)[0].X_fit)


def test_split_protocol_validation():
    with pytest.raises(ValueError, match="identical fits"):
        tasks.SplitProtocol(n_splits=3)
    with pytest.raises(ValueError, match="method"):
        tasks.SplitProtocol(method="leaky")
    with pytest.raises(ValueError, match="fit on"):
        tasks.SplitProtocol(test_fraction=0.5, reward_fraction=0.45)
    with pytest.raises(ValueError, match="holdout"):
        splits.dev_split_indices(np.arange(10) % 2, tasks.SplitProtocol())


def test_papers_protocol_splits_the_dev_part():
    task = tagged_task(split=splits.PAPER)
    dev_ids = set(task.test_split().X_fit["row_id"])
    assert len(dev_ids) == 150
    for split in task.dev_splits(seed=3):
        fit_ids, eval_ids = set(split.X_fit["row_id"]), set(split.X_eval["row_id"])
        assert not fit_ids & eval_ids
        assert fit_ids | eval_ids == dev_ids  # the test part never appears in a dev split


def test_kfold_protocol_scores_every_dev_row_once():
    task = tagged_task(split=tasks.SplitProtocol(method="kfold", n_splits=4))
    dev_splits = task.dev_splits()
    assert len(dev_splits) == 4
    eval_ids = np.concatenate([s.X_eval["row_id"].to_numpy() for s in dev_splits])
    assert sorted(eval_ids) == sorted(task.test_split().X_fit["row_id"])


def test_splits_are_deterministic_and_seeded():
    a, b = tagged_task(split=splits.PAPER), tagged_task(split=splits.PAPER)
    for sa, sb in zip(a.dev_splits(seed=7), b.dev_splits(seed=7)):
        pd.testing.assert_frame_equal(sa.X_eval, sb.X_eval)
        np.testing.assert_array_equal(sa.y_fit, sb.y_fit)
    assert not a.dev_splits(seed=0)[0].X_eval.equals(a.dev_splits(seed=1)[0].X_eval)


def test_split_indices_are_pinned_across_machines():
    # RandomState streams are frozen by numpy; this pins the rows so any change of splitter or seeds is caught.
    y = np.arange(40) % 2
    fit, ev = splits.dev_split_indices(y, splits.PAPER, seed=0)[0]
    assert sorted(ev.tolist())[:6] == PINNED_EVAL_ROWS
    assert splits.shuffled_order(8).tolist() == PINNED_ORDER


def test_bundled_rows_are_pinned_across_machines(bundled):
    # End to end (source file, cap, order, test part, reward rows): the same labels in the same order everywhere.
    titanic = bundled["titanic"]
    assert titanic.dev_splits(seed=0)[0].y_eval[:16].tolist() == PINNED_TITANIC_REWARD
    assert titanic.test_split().y_eval[:16].tolist() == PINNED_TITANIC_TEST
    capped = tasks.get("credit_default", max_rows=500)
    assert capped.test_split().X_eval["balance"].round(2).head(4).tolist() == PINNED_DEFAULT_BALANCE


PINNED_TITANIC_REWARD = [0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]
PINNED_TITANIC_TEST = [0, 1, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1]
PINNED_DEFAULT_BALANCE = [1558.86, 1604.78, 490.06, 962.14]
PINNED_EVAL_ROWS = [0, 6, 7, 9, 10, 11]
PINNED_ORDER = [7, 2, 1, 6, 0, 4, 3, 5]


def test_row_position_and_index_carry_no_label_information():
    task = tagged_task(n=400)  # source sorted by class
    for split in task.dev_splits() + [task.test_split()]:
        for X, y in ((split.X_fit, split.y_fit), (split.X_eval, split.y_eval)):
            assert isinstance(X.index, pd.RangeIndex)
            position_corr = np.corrcoef(np.arange(len(y)), y)[0, 1]
            assert abs(position_corr) < 0.25


def test_fold_sent_to_the_sandbox_has_no_scored_labels():
    split = tagged_task().dev_splits()[0]
    fold = split.fold()
    assert set(vars(fold)) == {"X_fit", "y_fit", "X_eval"}
    np.testing.assert_array_equal(fold.y_fit, split.y_fit)


# --- input formats and descriptions ---------------------------------------------------------------------------


def test_pandas_mode_keeps_real_dtypes_and_numpy_mode_label_encodes(bundled):
    titanic = bundled["titanic"]
    X = titanic.dev_splits()[0].X_fit
    assert not pd.api.types.is_numeric_dtype(X["sex"]) and X["age"].isna().any()
    numeric = tasks.get("titanic", input_format="numpy")
    Xn = numeric.dev_splits()[0].X_fit
    assert isinstance(Xn, np.ndarray) and Xn.dtype == np.float64 and Xn.shape == X.shape
    sex = list(X.columns).index("sex")
    assert set(np.unique(Xn[:, sex])) == {0.0, 1.0}  # female, male -> sorted codes
    assert np.isnan(Xn[:, list(X.columns).index("age")]).any()  # missing values stay NaN
    np.testing.assert_array_equal(numeric.dev_splits()[0].y_fit, titanic.dev_splits()[0].y_fit)


def test_to_numeric_array_by_hand():
    frame = pd.DataFrame({"n": [1.5, np.nan, 3.0], "c": ["b", "a", None], "flag": [True, False, True]})
    np.testing.assert_array_equal(
        tasks.task.to_numeric_array(frame),
        np.array([[1.5, 1.0, 1.0], [np.nan, 0.0, 0.0], [3.0, np.nan, 1.0]]),
    )


def test_descriptions(bundled):
    task = bundled["titanic"]
    paper = task.describe("paper")
    assert "5 features" in paper and "2 classes" in paper and "sex" not in paper  # shape only, as the paper
    rich = task.describe("rich")
    for text in ("sex", "age", "survived", "died", "missing", "pandas DataFrame"):
        assert text in rich
    table = task.feature_table()
    assert list(table.columns) == ["name", "dtype", "missing", "examples"]
    assert table.set_index("name").loc["age", "missing"] > 0
    assert "numpy float array" in tasks.get("titanic", input_format="numpy").describe("paper")
    assert task.metric == "ROC AUC" and "one-vs-one" in bundled["wine"].metric
    with pytest.raises(ValueError):
        task.describe("fancy")


# --- metric -------------------------------------------------------------------------------------------------------


def test_binary_auc_by_hand():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of 4 positive/negative pairs ranked right.
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]), 2) == 0.75
    assert metrics.roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8]), 2) == 0.75  # 1-D positive-class column


def test_multiclass_ovo_by_hand_and_against_sklearn():
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.array(
        [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]]
    )
    # pair (0,1): col 0: 0 {.6,.3} vs 1 {.2,.5} -> 3/4;  col 1: 1 {.5,.4} vs 0 {.3,.4} -> 3.5/4 (a tie counts
    #             half) -> (0.75 + 0.875) / 2 = 0.8125
    # pair (0,2): col 0: 0 scores {.6,.3} vs 2 scores {.1,.2} -> 1;  col 2: 2 {.7,.5} vs 0 {.1,.3} -> 1 -> 1.0
    # pair (1,2): col 1: 1 {.5,.4} vs 2 {.2,.3} -> 1;  col 2: 2 {.7,.5} vs 1 {.3,.1} -> 1 -> 1.0
    assert metrics.roc_auc(y, proba, 3) == pytest.approx((0.8125 + 1.0 + 1.0) / 3)
    rng = np.random.RandomState(0)
    y = rng.randint(0, 4, 200)
    proba = rng.dirichlet(np.ones(4), 200) + np.eye(4)[y] * 0.3
    proba /= proba.sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, proba, multi_class="ovo", average="macro")
    assert metrics.roc_auc(y, proba, 4) == pytest.approx(expected, abs=1e-12)


def test_multiclass_with_a_class_absent_from_the_scored_rows():
    y = np.array([0, 0, 2, 2])
    proba = np.array([[0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]])
    # only pair (0,2): col 0: {.7,.5} vs {.2,.4} -> 1;  col 2: {.6,.2} vs {.1,.4} -> 3/4 -> 0.875
    assert metrics.roc_auc(y, proba, 3) == pytest.approx(0.875)


def test_malformed_predictions_raise_scoring_errors():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(metrics.ScoringError, match=r"expected \(4, 2\)"):
        metrics.roc_auc(y, np.ones((3, 2)) / 2, 2)
    with pytest.raises(metrics.ScoringError):
        metrics.roc_auc(np.array([0, 1, 2]), np.ones(3), 3)
    with pytest.raises(metrics.ScoringError, match="two classes"):
        metrics.roc_auc(np.zeros(4, dtype=int), np.ones((4, 2)) / 2, 2)
    with pytest.raises(metrics.ScoringError, match="NaN"):
        metrics.roc_auc(y, np.array([0.1, np.nan, 0.3, 0.4]), 2)


def test_normalize_by_hand():
    task = tagged_task()
    assert task.normalize(0.9) is None  # nothing stored for this task
    task.reference_scores = {"dev": {"baseline": 0.5, "reference": 0.9}}
    assert task.baseline_score == 0.5 and task.reference_score == 0.9
    assert task.normalize(0.7) == pytest.approx(0.5)
    assert task.normalize(0.9) == pytest.approx(1.0)
    assert task.normalize(0.4) == pytest.approx(-0.25)
    assert task.normalize(None) is None


def test_stored_scores_apply_to_the_matching_setting_only(bundled):
    task = bundled[tasks.DEFAULT_TASK]
    assert task.baseline_score == 0.5 and task.reference_score > 0.9
    assert task.normalize(task.reference_score) == pytest.approx(1.0)
    other = tasks.get(tasks.DEFAULT_TASK, split=tasks.SplitProtocol(n_splits=3, resample_fraction=0.8))
    assert other.reference_score is None  # stored for the named protocols only
    paper = tasks.get(tasks.DEFAULT_TASK, split=splits.PAPER)
    assert paper.reference_score > 0.9 and paper.reference_score != task.reference_score


# --- misc -----------------------------------------------------------------------------------------------------


def test_wrap_body_builds_the_entry_point():
    program = wrap_body("from sklearn.dummy import DummyClassifier\n\nreturn DummyClassifier().fit(X, y)\n")
    assert ENTRY_POINT == "build_model"
    assert program.startswith("def build_model(X, y):\n    from sklearn.dummy")
    namespace: dict = {}
    exec(compile(program, "<program>", "exec"), namespace)
    model = namespace["build_model"](np.zeros((4, 1)), np.array([0, 1, 0, 1]))
    assert model.predict_proba(np.zeros((2, 1))).shape == (2, 2)
    assert wrap_body("   ") == "def build_model(X, y):\n    pass\n"


def test_unknown_names_and_bad_arguments():
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        tasks.get("nope")
    with pytest.raises(ValueError):
        tasks.names("everything")
    with pytest.raises(ValueError):
        tasks.get("iris", input_format="arrow")
    with pytest.raises(ValueError):
        tasks.SplitProtocol(method="bootstrap")
    with pytest.raises(ValueError, match="two classes"):
        tasks.Task("one", pd.DataFrame({"x": [1, 2, 3]}), ["a", "a", "a"])
    with pytest.raises(ValueError, match=r"classes \{'rare': 2\} have fewer than 4 rows"):
        tasks.Task("rare", pd.DataFrame({"x": range(12)}), ["common"] * 10 + ["rare"] * 2)
