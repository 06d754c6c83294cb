"""`Task`: one classification dataset prepared for the environment — rows, labels, splits, metric, descriptions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from tasks import DEFAULT_MAX_ROWS, metrics, splits
from tasks.loaders import RawData, csv_data
from tasks.splits import SplitProtocol

INPUT_FORMATS = ("pandas", "numpy")
MIN_CLASS_ROWS = 4  # enough for a class to land in the test part and on both sides of a 50/50 dev split


@dataclass
class Split:
    """Rows for one fit/score round. `y_eval` stays on the host: `fold()` drops it."""

    X_fit: Any
    y_fit: np.ndarray
    X_eval: Any
    y_eval: np.ndarray

    def fold(self):
        from sandbox.api import Fold

        return Fold(X_fit=self.X_fit, y_fit=self.y_fit, X_eval=self.X_eval)


def _encode_labels(target: pd.Series, class_order: list | None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(integer codes 0..K-1, class names, mask of rows kept). Rows with a missing label are dropped."""
    keep = target.notna().to_numpy()
    values = target[keep]
    if class_order is None:
        class_order = sorted(values.unique().tolist(), key=lambda v: (str(type(v)), v))
    lookup = {value: code for code, value in enumerate(class_order)}
    unknown = set(values.unique().tolist()) - set(lookup)
    if unknown:
        raise ValueError(
            f"labels {sorted(map(str, unknown))} are not in the declared class order {class_order}"
        )
    codes = values.map(lookup).to_numpy(dtype=np.int64)
    return codes, [str(c) for c in class_order], keep


def _check_class_counts(name: str, y: np.ndarray, class_names: list[str], max_rows: int | None) -> None:
    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < MIN_CLASS_ROWS:
        rare = {class_names[i]: int(c) for i, c in enumerate(counts) if c < MIN_CLASS_ROWS}
        raise ValueError(
            f"task {name!r}: classes {rare} have fewer than {MIN_CLASS_ROWS} rows (after the row cap of "
            f"{max_rows}); every class must reach both sides of each split. Merge or drop rare classes, "
            "or raise max_rows."
        )


def to_numeric_array(frame: pd.DataFrame) -> np.ndarray:
    """The paper's numeric form: numbers as float, every other column label-encoded (sorted categories), NaN kept."""
    columns = []
    for name in frame.columns:
        col = frame[name]
        if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
            columns.append(col.astype(float).to_numpy())
        else:
            categories = sorted(col.dropna().astype(str).unique())
            codes = pd.Categorical(col.astype(str).where(col.notna()), categories=categories).codes
            columns.append(np.where(codes < 0, np.nan, codes).astype(float))
    return np.column_stack(columns) if columns else np.zeros((len(frame), 0))


class Task:
    """A classification task. Build one with `tasks.get(name)`, `Task.from_csv(path, target=...)`, or directly
    from a feature frame and labels.

    Rows are capped (`max_rows`, stratified, seeded), put in a fixed shuffled order (row position carries no label
    information), and divided into fitting rows (the only labels agent code sees), reward rows and test rows
    (`split` says how; see `tasks.splits`). Fitting and reward rows together are the dev part.
    """

    def __init__(
        self,
        name: str,
        frame: pd.DataFrame,
        target: pd.Series | np.ndarray | list,
        *,
        source: str = "",
        description: str = "",
        target_name: str = "target",
        class_order: list | None = None,
        max_rows: int | None = DEFAULT_MAX_ROWS,
        input_format: str = "pandas",
        split: SplitProtocol | None = None,
        suite: str = "user",
    ):
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
        target = pd.Series(np.asarray(target, dtype=object) if not isinstance(target, pd.Series) else target)
        if len(frame) != len(target):
            raise ValueError(f"{len(frame)} feature rows but {len(target)} labels")
        codes, class_names, keep = _encode_labels(target.reset_index(drop=True), class_order)
        if len(class_names) < 2:
            raise ValueError(f"task {name!r} needs at least two classes, found {class_names}")
        frame = frame.reset_index(drop=True)[keep].reset_index(drop=True)
        self.source_rows = len(frame)
        rows = splits.cap_rows(codes, max_rows)
        rows = rows[splits.shuffled_order(len(rows))]
        self._frame = frame.iloc[rows].reset_index(drop=True)
        self._y = codes[rows]
        _check_class_counts(name, self._y, class_names, max_rows)

        self.name = name
        self.source = source
        self.description = description
        self.target = target_name
        self.class_names = class_names
        self.max_rows = max_rows
        self.input_format = input_format
        self.split_protocol = split or SplitProtocol()
        self.suite = suite
        self._dev_rows, self._test_rows = splits.holdout_split(self._y, self.split_protocol.test_fraction)
        fit, reward = splits.reward_split(self._y[self._dev_rows], self.split_protocol)
        self._fit_rows, self._reward_rows = self._dev_rows[fit], self._dev_rows[reward]
        # {"dev": {"baseline": b, "reference": r}, "test": {...}} to use instead of the stored scores
        # (e.g. `task.reference_scores = tasks.reference.compute(task, sandbox)` for a CSV task).
        self.reference_scores: dict | None = None

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_raw(cls, name: str, raw: RawData, **kw) -> Task:
        return cls(
            name,
            raw.frame,
            raw.target,
            source=raw.source,
            description=raw.description,
            target_name=str(raw.target.name or "target"),
            class_order=raw.class_order,
            **kw,
        )

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        target: str,
        name: str | None = None,
        *,
        drop: list[str] | tuple[str, ...] = (),
        description: str | None = None,
        read_csv_kwargs: dict | None = None,
        **kw,
    ) -> Task:
        """A task from any CSV file: `target` is the label column; `drop` lists id-like columns to remove."""
        raw = csv_data(path, target, drop, **(read_csv_kwargs or {}))
        if description:
            raw.description = description
        return cls.from_raw(name or os.path.splitext(os.path.basename(str(path)))[0], raw, **kw)

    # --- basic facts ----------------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def metric(self) -> str:
        """The score every program is judged by (as the ETPO paper: ROC AUC, one-vs-one macro for multiclass)."""
        return "ROC AUC" if self.n_classes == 2 else "ROC AUC (one-vs-one, macro average)"

    @property
    def n_rows(self) -> int:
        return len(self._y)

    @property
    def n_features(self) -> int:
        return self._frame.shape[1]

    @property
    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self._y, minlength=self.n_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    @property
    def missing_fraction(self) -> float:
        """Share of feature cells that are missing."""
        cells = self._frame.size
        return float(self._frame.isna().to_numpy().sum() / cells) if cells else 0.0

    @property
    def has_missing(self) -> bool:
        return bool(self._frame.isna().to_numpy().any())

    @property
    def has_numeric_missing(self) -> bool:
        """Whether a numeric column has missing values (a NaN-intolerant model without imputation fails)."""
        numeric = self._frame.select_dtypes(include="number")
        return bool(numeric.isna().to_numpy().any())

    @property
    def has_categorical(self) -> bool:
        return any(not pd.api.types.is_numeric_dtype(t) for t in self._frame.dtypes)

    @property
    def n_dev_rows(self) -> int:
        return len(self._dev_rows)

    @property
    def n_test_rows(self) -> int:
        return len(self._test_rows)

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, rows={self.n_rows}, features={self.n_features}, classes={self.n_classes}, "
            f"input_format={self.input_format!r})"
        )

    # --- features as the program sees them ----------------------------------------------------------------

    @cached_property
    def _numeric(self) -> np.ndarray:
        return to_numeric_array(self._frame)

    def _features(self, rows: np.ndarray) -> Any:
        if self.input_format == "numpy":
            return self._numeric[rows].copy()
        # A fresh RangeIndex: the original row numbers must not reach the program.
        return self._frame.iloc[rows].reset_index(drop=True)

    def _split(self, fit_rows: np.ndarray, eval_rows: np.ndarray) -> Split:
        return Split(
            X_fit=self._features(fit_rows),
            y_fit=self._y[fit_rows].copy(),
            X_eval=self._features(eval_rows),
            y_eval=self._y[eval_rows].copy(),
        )

    @property
    def n_fit_rows(self) -> int:
        """Rows whose labels agent code receives (holdout); the paper's protocols fit on parts of the dev part."""
        return len(self._fit_rows) if self.split_protocol.labels_by_construction else self.n_dev_rows

    def dev_splits(self, seed: int = 0) -> list[Split]:
        """The fits a reward is computed from. Holdout: fits on (resamples of) the fitting rows, each scored on the
        reward rows. The paper's protocols: seeded splits of the dev part (open to cross-fold channels)."""
        protocol = self.split_protocol
        if protocol.labels_by_construction:
            return [
                self._split(self._fit_rows[rows], self._reward_rows)
                for rows in splits.fit_resamples(self._y[self._fit_rows], protocol, seed)
            ]
        return [
            self._split(self._dev_rows[fit], self._dev_rows[ev])
            for fit, ev in splits.dev_split_indices(self._y[self._dev_rows], protocol, seed)
        ]

    def test_split(self) -> Split:
        """Final evaluation: fit on the fitting rows (holdout) or the dev part (paper), score the test rows."""
        fit_rows = self._fit_rows if self.split_protocol.labels_by_construction else self._dev_rows
        return self._split(fit_rows, self._test_rows)

    def scored_rows(self) -> dict[str, np.ndarray]:
        """Row positions by role ("fit", "reward", "test"), for audits and tests."""
        return {"fit": self._fit_rows.copy(), "reward": self._reward_rows.copy(), "test": self._test_rows.copy()}

    # --- metric and reference scores ----------------------------------------------------------------------

    def score(self, y_true: np.ndarray, proba: np.ndarray) -> float:
        """ROC AUC; one-vs-one macro for multiclass. Raises `metrics.ScoringError` on malformed predictions."""
        return metrics.roc_auc(y_true, proba, self.n_classes)

    def _reference_entry(self, part: str = "dev") -> dict | None:
        from tasks import reference

        return reference.lookup(self, part)

    @property
    def baseline_score(self) -> float | None:
        """Dev score of the baseline pipeline (None when no stored value matches this task's rows and format)."""
        entry = self._reference_entry()
        return entry["baseline"] if entry else None

    @property
    def reference_score(self) -> float | None:
        """Dev score of the best pipeline of the fixed reference grid (None when not stored for this setting)."""
        entry = self._reference_entry()
        return entry["reference"] if entry else None

    def normalize(self, score: float | None, part: str = "dev") -> float | None:
        """(score - baseline) / (reference - baseline): 0 = baseline pipeline, 1 = best standard pipeline."""
        entry = self._reference_entry(part)
        if score is None or entry is None or entry["reference"] <= entry["baseline"]:
            return None
        return (score - entry["baseline"]) / (entry["reference"] - entry["baseline"])

    # --- descriptions ---------------------------------------------------------------------------------------

    def feature_table(self, n_examples: int = 3) -> pd.DataFrame:
        """One row per feature: name, dtype (as the program receives it), missing count, a few example values."""
        rows = []
        for column in self._frame.columns:
            col = self._frame[column]
            dtype = "float64" if self.input_format == "numpy" else str(col.dtype)
            examples = col.dropna().drop_duplicates().head(n_examples).tolist()
            rows.append(
                {
                    "name": str(column),
                    "dtype": dtype,
                    "missing": int(col.isna().sum()),
                    "examples": ", ".join(_short(v) for v in examples),
                }
            )
        return pd.DataFrame(rows, columns=["name", "dtype", "missing", "examples"])

    def describe(self, style: str = "paper") -> str:
        """Dataset description for prompts. "paper": shape only, as in ETPO; "rich": names, dtypes, examples."""
        if style == "paper":
            return self._describe_paper()
        if style == "rich":
            return self._describe_rich()
        raise ValueError(f"style must be 'paper' or 'rich', got {style!r}")

    def _fit_shape(self) -> tuple[int, int]:
        protocol = self.split_protocol
        if protocol.labels_by_construction:
            n_fit = len(splits.fit_resamples(self._y[self._fit_rows], protocol)[0])
        elif protocol.method == "kfold":
            n_fit = self.n_dev_rows - self.n_dev_rows // protocol.n_splits
        else:
            n_fit = self.n_dev_rows - int(np.ceil(protocol.eval_fraction * self.n_dev_rows))
        return n_fit, self.n_features

    def _input_sentence(self) -> str:
        n_fit, n_features = self._fit_shape()
        if self.input_format == "numpy":
            kind = f"a numpy float array of shape ({n_fit}, {n_features}) (categorical columns label-encoded)"
        else:
            kind = f"a pandas DataFrame with {n_fit} rows and {n_features} columns"
        missing = " Some values are missing (NaN)." if self.has_missing else ""
        return (
            f"X is {kind}.{missing} y is a numpy integer array of class labels 0..{self.n_classes - 1} "
            f"({self.n_classes} classes)."
        )

    def _describe_paper(self) -> str:
        return (
            f"Classification task with {self.n_features} features and {self.n_classes} classes. "
            + self._input_sentence()
        )

    def _describe_rich(self) -> str:
        balance = ", ".join(
            f"{i} = {name!r} ({count})" for i, (name, count) in enumerate(self.class_counts.items())
        )
        table = self.feature_table().to_string(index=False, max_colwidth=48)
        parts = [
            f"Task: {self.name} ({self.source})",
            self.description,
            f"Target: {self.target!r}; classes: {balance}.",
            self._input_sentence(),
            "Features:",
            table,
        ]
        return "\n".join(p for p in parts if p)


def _short(value: Any, width: int = 16) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
