"""`tasks.evaluate` (the one evaluator), reference scores and the `etpo tasks` commands."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest

import tasks
from agents.cli import main as etpo_main
from sandbox import Job, RunResult, Status
from tasks import reference
from tasks.demos import Recipe, render
from tasks.programs import wrap_body

LOGISTIC_PROGRAM = wrap_body(
    render(
        Recipe(
            "logistic_regression",
            (("C", 1.0), ("max_iter", 1000)),
            "median",
            "onehot",
            "most_frequent",
            "standard",
        )
    )
)


class RecordingSandbox:
    """Stands in for a sandbox: records the job and answers with predictions made by `predict(job, fold_index)`."""

    isolation = "fake"

    def __init__(self, predict=None, result: RunResult | None = None):
        self.jobs: list[Job] = []
        self.predict = predict or (lambda job, i: np.full((len(job.folds[i].X_eval), 2), 0.5))
        self.result = result

    def run(self, job: Job) -> RunResult:
        self.jobs.append(job)
        if self.result is not None:
            return self.result
        return RunResult(
            Status.OK,
            predictions=[self.predict(job, i) for i in range(len(job.folds))],
            isolation=self.isolation,
        )

    def close(self) -> None:
        pass


def _tagged_task() -> tasks.Task:
    rng = np.random.RandomState(0)
    n = 120
    frame = pd.DataFrame({"row_id": np.arange(n), "x": rng.normal(size=n)})
    # five fits on resamples of the fitting rows: the evaluator's multi-fold path
    return tasks.Task("tagged", frame, np.arange(n) % 2,
                      split=tasks.SplitProtocol(n_splits=5, resample_fraction=0.8))


# --- the evaluator ---------------------------------------------------------------------------------------------


def test_job_carries_features_and_training_labels_only():
    task = _tagged_task()
    sandbox = RecordingSandbox()
    ev = tasks.evaluate(task, "def build_model(X, y): ...", sandbox, seed=4)
    assert ev.status is Status.OK and ev.score == 0.5 and ev.split_scores == [0.5] * 5
    (job,) = sandbox.jobs
    assert set(vars(job)) == {"program", "folds", "entry_point", "predict_method"}
    for fold, split in zip(job.folds, task.dev_splits(seed=4)):
        assert set(vars(fold)) == {"X_fit", "y_fit", "X_eval"}
        pd.testing.assert_frame_equal(fold.X_eval, split.X_eval)
        np.testing.assert_array_equal(fold.y_fit, split.y_fit)
        assert len(fold.y_fit) == len(fold.X_fit)
        assert "target" not in fold.X_fit.columns
    tasks.evaluate(task, "def build_model(X, y): ...", sandbox, part="test")
    assert len(sandbox.jobs[-1].folds) == 1 and len(sandbox.jobs[-1].folds[0].X_eval) == task.n_test_rows


def test_scores_are_computed_on_the_host_from_the_held_back_labels():
    task = _tagged_task()
    lookup = {row_id: label for row_id, label in zip(range(120), np.arange(120) % 2)}

    def perfect(
        job, i
    ):  # a fake sandbox that cheats through the row ids: only the host could know the labels
        y = np.array([lookup[r] for r in job.folds[i].X_eval["row_id"]])
        return np.column_stack([1 - y, y]).astype(float)

    ev = tasks.evaluate(task, "program", RecordingSandbox(perfect))
    assert ev.score == 1.0 and ev.split_scores == [1.0] * 5


def test_failures_pass_through_unchanged():
    failed = RunResult(
        Status.RUNTIME_ERROR, message="NameError: name 'RandomForrest' is not defined", error_type="NameError"
    )
    ev = tasks.evaluate(_tagged_task(), "program", RecordingSandbox(result=failed))
    assert ev.status is Status.RUNTIME_ERROR and ev.score is None and ev.split_scores == []
    assert ev.result is failed and ev.normalized is None and not ev.ok


def test_unscorable_predictions_become_invalid_output():
    task = _tagged_task()
    ev = tasks.evaluate(
        task, "program", RecordingSandbox(lambda job, i: np.ones((len(job.folds[i].X_eval), 3)))
    )
    assert ev.status is Status.INVALID_OUTPUT and ev.score is None
    assert ev.result.status is Status.INVALID_OUTPUT and "expected (" in ev.result.message
    short = RecordingSandbox()
    short.run = lambda job: RunResult(Status.OK, predictions=[np.ones((3, 2))])
    ev = tasks.evaluate(task, "program", short)
    assert ev.status is Status.INVALID_OUTPUT and "5 folds" in ev.result.message
    with pytest.raises(ValueError):
        tasks.evaluate(task, "program", RecordingSandbox(), part="validation")


def test_csv_task_end_to_end_in_the_sandbox(tmp_path, local_sandbox):
    rng = np.random.RandomState(3)
    n = 200
    df = pd.DataFrame({"dose": rng.uniform(0, 10, n), "group": rng.choice(["a", "b"], n)})
    df["outcome"] = np.where(df["dose"] + rng.normal(0, 1, n) > 5, "responder", "none")
    df.loc[::17, "dose"] = np.nan
    path = tmp_path / "trial.csv"
    df.to_csv(path, index=False)
    task = tasks.Task.from_csv(path, target="outcome")
    ev = tasks.evaluate(task, LOGISTIC_PROGRAM, local_sandbox)
    assert ev.status is Status.OK, ev.result.message
    assert len(ev.split_scores) == 1 and ev.score == pytest.approx(np.mean(ev.split_scores))
    assert ev.score > 0.85 and ev.result.isolation == "local"
    assert ev.normalized is None  # no reference scores for a user CSV until computed
    task.reference_scores = {"test": {"baseline": 0.5, "reference": 1.0}}
    final = tasks.evaluate(task, LOGISTIC_PROGRAM, local_sandbox, part="test")
    assert final.status is Status.OK and len(final.split_scores) == 1
    assert final.normalized == pytest.approx((final.score - 0.5) / 0.5)


def test_bundled_task_in_the_sandbox_reports_normalized_scores(local_sandbox):
    task = tasks.get(tasks.DEFAULT_TASK)
    ev = tasks.evaluate(task, LOGISTIC_PROGRAM, local_sandbox)
    assert ev.status is Status.OK, ev.result.message
    expected = (ev.score - task.baseline_score) / (task.reference_score - task.baseline_score)
    assert ev.normalized == pytest.approx(expected)


# --- reference scores ---------------------------------------------------------------------------------------------


def test_reference_compute_picks_the_dev_best_pipeline():
    """With a fake sandbox whose quality depends on the program: majority -> chance, extra trees -> perfect."""
    task = _tagged_task()
    labels = np.arange(120) % 2

    def by_program(job, i):
        y = labels[job.folds[i].X_eval["row_id"].to_numpy()]
        if "DummyClassifier" in job.program:
            return np.full((len(y), 2), 0.5)
        noise = 0.0 if "ExtraTreesClassifier" in job.program else 0.8
        p = np.clip(y + np.random.RandomState(i).normal(0, noise, len(y)), 0, 1)
        return np.column_stack([1 - p, p])

    entry = reference.compute(task, RecordingSandbox(by_program))
    assert entry["dev"]["baseline"] == 0.5 and entry["dev"]["best"] == "extra_trees"
    assert entry["dev"]["reference"] == 1.0 and set(entry["dev"]["grid"]) == set(reference.GRID)
    assert entry["test"] == {"baseline": 0.5, "reference": 1.0, "best": "extra_trees"}


def test_reference_compute_refuses_when_every_pipeline_fails():
    failed = RunResult(Status.RUNTIME_ERROR, message="boom")
    with pytest.raises(RuntimeError, match="reference programs failed"):
        reference.compute(_tagged_task(), RecordingSandbox(result=failed))


def test_stored_reference_scores_cover_the_bundled_suite():
    store = reference.load_store()
    assert store["command"] == reference.RECOMPUTE_COMMAND
    for name, protocol in tasks.splits.PROTOCOLS.items():
        assert store["protocols"][name]["split"] == dataclasses.asdict(protocol)
    settings = itertools.product(tasks.names("bundled"), ("pandas", "numpy"), tasks.splits.PROTOCOLS.values())
    for name, input_format, protocol in settings:
        task = tasks.get(name, input_format=input_format, split=protocol)
        entry = reference.lookup(task)
        assert entry is not None, (name, input_format, protocol.method)
        assert entry["baseline"] < entry["reference"] <= 1.0, (name, input_format, protocol.method)
        assert entry["best"] in reference.GRID
        test_entry = reference.lookup(task, "test")
        assert test_entry["baseline"] < test_entry["reference"] <= 1.0


def test_reference_programs_are_sound_source():
    for name in reference.GRID:
        compile(reference.grid_program(name), name, "exec")
    compile(reference.baseline_program(), "baseline", "exec")


# --- the CLI ------------------------------------------------------------------------------------------------------


def test_cli_tasks_list_shows_the_bundled_suite(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    assert etpo_main(["tasks", "list"]) == 0
    out = capsys.readouterr().out
    for name in tasks.names("bundled"):
        assert name in out
        task = tasks.get(name)
        assert f"{task.reference_score:.3f}" in out and str(task.n_rows) in out


def test_cli_tasks_show_and_reference(capsys):
    assert etpo_main(["tasks", "show", "iris", "--style", "paper"]) == 0
    out = capsys.readouterr().out
    assert "4 features" in out and "74 fitting (the only labels programs see), 38 reward, 38 test" in out
    assert etpo_main(["tasks", "reference"]) == 0
    out = capsys.readouterr().out
    assert "protocol holdout" in out and "breast_cancer" in out and reference.RECOMPUTE_COMMAND in out
    assert etpo_main(["tasks", "reference", "--protocol", "paper"]) == 0
    assert "protocol paper" in capsys.readouterr().out


def test_cli_list_marks_paper_tasks_that_are_not_downloaded(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "220")
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path / "sklearn"))
    monkeypatch.setenv("ETPO_DATA_DIR", str(tmp_path / "data"))
    assert etpo_main(["tasks", "list", "--suite", "paper"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert all(rows[name][:4] == ["-"] * 4 for name in tasks.names("paper"))  # no rows, features, classes, missing
    assert "not downloaded yet" in out
    assert rows["credit-g"][4] == "OpenML" and rows["spaceship-titanic"][4] == "Kaggle"


def test_cli_download_explains_kaggle_data(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ETPO_DATA_DIR", str(tmp_path))
    assert etpo_main(["tasks", "download", "kidney-stone"]) == 1
    assert "kaggle competitions download -c playground-series-s3e12" in capsys.readouterr().out
