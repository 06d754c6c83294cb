"""Leak-free, seeded row selection: the row cap, the three row sets, and the fits that score a program.

A task's rows fall into three disjoint sets (the default protocol, `holdout`):
  fitting rows  — the only rows whose labels agent code ever receives;
  reward rows   — scored on the host by fits on the fitting rows; their labels never enter a sandbox;
  test rows     — scored the same way for final evaluation only; their labels never enter a sandbox either.
Because no sandbox in any fold, job, episode or benchmark cell ever holds a scored row's label, no channel between
runs (page cache, timing, anything not yet found) can carry one. The ETPO paper's protocol (random 50/50 splits of
the dev part, `PAPER`) scores rows whose labels other folds fit on, so it is open to such channels: it is an explicit
option, never the default.

Everything here works on row indices only (pure functions of the labels and a seed), so the same seed gives the
same rows on every machine. scikit-learn's splitters draw from `np.random.RandomState`, whose stream numpy keeps
frozen across versions and platforms; a test pins the indices to catch any change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import (
    KFold,
    ShuffleSplit,
    StratifiedKFold,
    StratifiedShuffleSplit,
    train_test_split,
)

# Seeds that define a task's rows (the cap, the row order, the test part). They are part of the task's identity,
# independent of the seed that picks the dev splits.
CAP_SEED = 0
ORDER_SEED = 1
TEST_SEED = 2
REWARD_SEED = 3  # divides the dev part into fitting and reward rows (holdout protocol)

METHODS = ("holdout", "random", "kfold")


@dataclass(frozen=True)
class SplitProtocol:
    """How a task's rows are divided and which fits score a program.

    method:
      "holdout" (default) = three disjoint row sets: fitting, reward and test rows. A reward is the mean over
        `n_splits` fits on the fitting rows (all of them when `n_splits` is 1, else seeded stratified subsamples of
        `resample_fraction` of them), each scored on the same reward rows; final evaluation fits on the fitting rows
        and scores the test rows. Scored labels never enter a sandbox.
      "random" = `n_splits` seeded random splits of the dev part (fitting and reward rows together), `eval_fraction`
        of it scored in each: the ETPO paper's protocol (`PAPER`: 5 random 50/50 splits). Open to cross-fold
        channels: every scored row's label is a fitted label of another fold or job.
      "kfold" = stratified k-fold over the dev part (every dev row scored once). Open to cross-fold channels too.
    reward_fraction: holdout: share of ALL rows that score rewards.
    test_fraction: share of all rows held out for final evaluation only; rewards never see them.
    """

    method: str = "holdout"
    n_splits: int = 1
    eval_fraction: float = 0.5
    test_fraction: float = 0.25
    reward_fraction: float = 0.25
    resample_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"split method must be one of {METHODS}, got {self.method!r}")
        if self.n_splits < 1 or (self.method == "kfold" and self.n_splits < 2):
            raise ValueError(f"n_splits={self.n_splits} is too small for method {self.method!r}")
        for name in ("eval_fraction", "test_fraction", "reward_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.test_fraction + self.reward_fraction >= 0.9:
            raise ValueError("test_fraction + reward_fraction leaves under 10% of the rows to fit on")
        if not 0.0 < self.resample_fraction <= 1.0:
            raise ValueError(f"resample_fraction must be in (0, 1], got {self.resample_fraction}")
        if self.method == "holdout" and self.n_splits > 1 and self.resample_fraction == 1.0:
            raise ValueError("n_splits > 1 identical fits: set resample_fraction below 1 to fit on subsamples")

    @property
    def labels_by_construction(self) -> bool:
        """Whether the labels of scored rows stay out of every sandbox (only `holdout`)."""
        return self.method == "holdout"

    @property
    def channel_warning(self) -> str | None:
        """What a user choosing this protocol must know, or None for the safe default."""
        if self.labels_by_construction:
            return None
        return (
            f"split method {self.method!r} scores rows whose labels other folds and jobs fit on: agent code that "
            "keeps state between runs (page cache, timing, any channel not yet closed) can carry labels to the "
            "fold that scores them. Use it to reproduce the ETPO paper, not to rank agents that may exploit it."
        )


# The ETPO paper's protocol: 5 random 50/50 splits of the dev part (open to cross-fold channels).
PAPER = SplitProtocol(method="random", n_splits=5, eval_fraction=0.5)
PROTOCOLS = {"holdout": SplitProtocol(), "paper": PAPER}


def _stratify(y: np.ndarray, n_parts: int) -> bool:
    """Stratify when every class can appear on each side (at least `n_parts` members)."""
    _, counts = np.unique(y, return_counts=True)
    return len(counts) > 1 and int(counts.min()) >= n_parts


def cap_rows(y: np.ndarray, max_rows: int | None, seed: int = CAP_SEED) -> np.ndarray:
    """Indices of at most `max_rows` rows, stratified by class, in their original order."""
    n = len(y)
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    if max_rows < 2:
        raise ValueError(f"max_rows must be at least 2, got {max_rows}")
    keep, _ = train_test_split(
        np.arange(n), train_size=max_rows, random_state=seed, stratify=y if _stratify(y, 2) else None
    )
    return np.sort(keep)


def shuffled_order(n: int, seed: int = ORDER_SEED) -> np.ndarray:
    """A fixed permutation of the rows, so that row position never carries label information
    (many source files are sorted by class)."""
    return np.random.RandomState(seed).permutation(n)


def holdout_split(
    y: np.ndarray, test_fraction: float, seed: int = TEST_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(dev indices, test indices), stratified; both sorted."""
    idx = np.arange(len(y))
    dev, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=y if _stratify(y, 2) else None
    )
    return np.sort(dev), np.sort(test)


def reward_split(y_dev: np.ndarray, protocol: SplitProtocol, seed: int = REWARD_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fitting indices, reward indices) into the dev part, stratified; both sorted. The reward share of the dev part
    is reward_fraction / (1 - test_fraction), so that reward rows are `reward_fraction` of all rows."""
    share = protocol.reward_fraction / (1.0 - protocol.test_fraction)
    idx = np.arange(len(y_dev))
    fit, reward = train_test_split(
        idx, test_size=share, random_state=seed, stratify=y_dev if _stratify(y_dev, 2) else None
    )
    return np.sort(fit), np.sort(reward)


def fit_resamples(y_fit: np.ndarray, protocol: SplitProtocol, seed: int = 0) -> list[np.ndarray]:
    """Indices into the fitting rows for each of the holdout protocol's fits: all of them, or seeded stratified
    subsamples of `resample_fraction` (sorted)."""
    if protocol.n_splits == 1 and protocol.resample_fraction == 1.0:
        return [np.arange(len(y_fit))]
    stratified = _stratify(y_fit, 2)
    splitter = (StratifiedShuffleSplit if stratified else ShuffleSplit)(
        n_splits=protocol.n_splits, train_size=protocol.resample_fraction, random_state=seed
    )
    return [np.sort(np.asarray(rows)) for rows, _ in splitter.split(np.zeros((len(y_fit), 1)), y_fit)]


def dev_split_indices(
    y: np.ndarray, protocol: SplitProtocol, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit indices, eval indices) into `y` (the dev part) for each split of the paper's protocols ("random",
    "kfold"). Stratified whenever the class counts allow it."""
    if protocol.method == "holdout":
        raise ValueError("the holdout protocol does not split the dev part; see Task.dev_splits")
    X_dummy = np.zeros((len(y), 1))
    if protocol.method == "kfold":
        stratified = _stratify(y, protocol.n_splits)
        splitter = (StratifiedKFold if stratified else KFold)(
            n_splits=protocol.n_splits, shuffle=True, random_state=seed
        )
    else:
        stratified = _stratify(y, 2)
        splitter = (StratifiedShuffleSplit if stratified else ShuffleSplit)(
            n_splits=protocol.n_splits, test_size=protocol.eval_fraction, random_state=seed
        )
    return [(np.asarray(fit), np.asarray(ev)) for fit, ev in splitter.split(X_dummy, y)]
