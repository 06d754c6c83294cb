"""Labels by construction: the labels of reward and test rows never cross the sandbox boundary.

Every job any part of the product sends is recorded at `Sandbox.run` by a sandbox that runs nothing (it answers
uniform predictions), on a task whose feature frame carries each row's identity. Across resets, split seeds, episode
modes, the benchmark's evaluation points and its final test scoring, every fold's fitted rows must be fitting rows,
with their own labels: a channel between runs then has no scored label to carry.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

import tasks
from agents.benchmark.config import BenchConfig
from agents.benchmark.run import run_cell
from etpo_env.env import DataSciCodeEnv
from sandbox.api import Job, RunResult, Status
from tasks.splits import PAPER, SplitProtocol
from tasks.task import Task

PROGRAM = """\
def build_model(X, y):
    from sklearn.dummy import DummyClassifier

    return DummyClassifier().fit(X, y)
"""


class RecordingSandbox:
    """Records every job; runs nothing; answers uniform class probabilities for every fold."""

    isolation = "recording"

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.jobs: list[Job] = []

    def run(self, job: Job) -> RunResult:
        self.jobs.append(job)
        predictions = [np.full((len(fold.X_eval), self.n_classes), 1.0 / self.n_classes) for fold in job.folds]
        return RunResult(Status.OK, predictions=predictions, isolation=self.isolation)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def identified_task(protocol: SplitProtocol | None = None, n: int = 240) -> tuple[Task, np.ndarray]:
    """A 3-class task whose `row_id` column names the source row; returns (task, label of each source row)."""
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 3, size=n)
    frame = pd.DataFrame({"row_id": np.arange(n), "x": rng.normal(size=n) + labels})
    return Task("identified", frame, labels, split=protocol), labels


def fitted_rows(jobs: list[Job], labels: np.ndarray) -> set[int]:
    """Every source row whose label a job carried; checks each carried label is that row's own."""
    rows: set[int] = set()
    for job in jobs:
        for fold in job.folds:
            ids = fold.X_fit["row_id"].to_numpy()
            np.testing.assert_array_equal(fold.y_fit, labels[ids])
            rows.update(ids.tolist())
            assert set(vars(fold)) == {"X_fit", "y_fit", "X_eval"}  # no other field can carry anything
    return rows


def source_ids(task: Task, role: str) -> set[int]:
    frame = task._frame  # the task's own rows, in task order: the test may look, agent code may not
    return set(frame["row_id"].to_numpy()[task.scored_rows()[role]].tolist())


def test_the_three_row_sets_are_disjoint_and_cover_every_row():
    task, _ = identified_task()
    fit, reward, test = (source_ids(task, role) for role in ("fit", "reward", "test"))
    assert not fit & reward and not fit & test and not reward & test
    assert len(fit | reward | test) == task.n_rows
    assert len(reward) == pytest.approx(0.25 * task.n_rows, abs=2)
    assert len(test) == pytest.approx(0.25 * task.n_rows, abs=2)


@pytest.mark.parametrize("protocol", [SplitProtocol(), SplitProtocol(n_splits=5, resample_fraction=0.8)],
                         ids=["one-fit", "five-resamples"])
@pytest.mark.parametrize("mode", ["fix", "refine"])
def test_no_scored_label_enters_a_sandbox_from_the_env(protocol, mode):
    task, labels = identified_task(protocol)
    sandbox = RecordingSandbox(task.n_classes)
    for split_seed in (0, 7, None):
        env = DataSciCodeEnv(task=task, sandbox=sandbox, mode=mode, max_attempts=3, split_seed=split_seed)
        for episode in range(3):
            env.reset(seed=episode)
            done = False
            while not done:
                _, _, terminated, truncated, info = env.step(PROGRAM)
                assert info["status"] == "ok"
                done = terminated or truncated
        env.close()
    assert len(sandbox.jobs) >= 9
    fitted = fitted_rows(sandbox.jobs, labels)
    assert fitted <= source_ids(task, "fit")
    assert not fitted & (source_ids(task, "reward") | source_ids(task, "test"))
    # the scored features do reach the sandbox (that is what gets predicted), the scored labels do not
    evaluated = {int(i) for job in sandbox.jobs for fold in job.folds for i in fold.X_eval["row_id"]}
    assert evaluated == source_ids(task, "reward")


def test_no_scored_label_enters_a_sandbox_from_the_benchmark_or_final_evaluation():
    task, labels = identified_task()
    sandbox = RecordingSandbox(task.n_classes)
    config = BenchConfig(agents=["scripted"], tasks=[task.name], seeds=[0], budget=6, eval_episodes=3)
    record = run_cell(config, "scripted", task, 0, sandbox, model=lambda: "unused")
    assert record.get("error") is None, record.get("traceback")
    fitted = fitted_rows(sandbox.jobs, labels)
    assert fitted == source_ids(task, "fit")  # final evaluation fits on the fitting rows, all of them
    evaluated = {int(i) for job in sandbox.jobs for fold in job.folds for i in fold.X_eval["row_id"]}
    assert source_ids(task, "test") <= evaluated  # the final programs were scored on test
    assert not fitted & (source_ids(task, "reward") | source_ids(task, "test"))


def test_the_papers_protocol_is_explicit_and_says_what_it_gives_up(caplog):
    task, labels = identified_task(PAPER)
    assert not PAPER.labels_by_construction and SplitProtocol().labels_by_construction
    assert "cross-fold channels" not in (SplitProtocol().channel_warning or "")
    assert "other folds" in PAPER.channel_warning
    sandbox = RecordingSandbox(task.n_classes)
    with caplog.at_level(logging.WARNING, logger="etpo_env.env"):
        env = DataSciCodeEnv(task=task, sandbox=sandbox)
        env.reset(seed=0)
        env.step(PROGRAM)
    assert any("other folds" in r.getMessage() for r in caplog.records)
    # what it gives up, shown: a row scored in one fold is fitted, with its label, in another
    fitted = fitted_rows(sandbox.jobs, labels)
    evaluated = {int(i) for job in sandbox.jobs for fold in job.folds for i in fold.X_eval["row_id"]}
    assert fitted & evaluated


def test_env_config_chooses_the_protocol_by_name():
    env = DataSciCodeEnv(task="iris", sandbox=RecordingSandbox(3), split="paper")
    assert env.task.split_protocol == PAPER
    assert DataSciCodeEnv(task="iris", sandbox=RecordingSandbox(3)).task.split_protocol == SplitProtocol()
    with pytest.raises(ValueError, match="split"):
        DataSciCodeEnv(task="iris", sandbox=RecordingSandbox(3), split="leaky")
    assert tasks.get("iris").scored_rows()["reward"].size > 0


def test_the_protocol_names_agree_everywhere():
    from etpo_env.config import SPLITS
    from tasks.cli import PROTOCOL_CHOICES
    from tasks.splits import PROTOCOLS

    assert tuple(PROTOCOLS) == SPLITS == tuple(PROTOCOL_CHOICES)
