"""Leak-free, seeded row selection: the row cap, the held-out test part, and the dev splits.

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


@dataclass(frozen=True)
class SplitProtocol:
    """How a task's rows are divided.

    method: "random" = `n_splits` seeded random splits, `eval_fraction` of the dev part scored in each (the ETPO
    paper's protocol: 5 random 50/50 splits); "kfold" = stratified k-fold over the dev part (every dev row is
    scored exactly once).
    test_fraction: share of the rows held out for final evaluation only; rewards never see them.
    """

    method: str = "random"
    n_splits: int = 5
    eval_fraction: float = 0.5
    test_fraction: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in ("random", "kfold"):
            raise ValueError(f"split method must be 'random' or 'kfold', got {self.method!r}")
        if self.n_splits < 1 or (self.method == "kfold" and self.n_splits < 2):
            raise ValueError(f"n_splits={self.n_splits} is too small for method {self.method!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")


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


def dev_split_indices(
    y: np.ndarray, protocol: SplitProtocol, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit indices, eval indices) into `y` for each dev split. Stratified whenever the class counts allow it."""
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
