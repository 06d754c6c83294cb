"""The task metric: ROC AUC of predicted class probabilities (one-vs-one macro average for multiclass, as ETPO)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


class ScoringError(ValueError):
    """The predictions cannot be scored (wrong shape for the number of classes)."""


def as_probability_matrix(proba: np.ndarray, n_rows: int, n_classes: int) -> np.ndarray:
    """Bring `predict_proba` output to shape (n_rows, n_classes).

    A 1-D array is accepted for binary tasks (the positive-class probability), as a user would expect.
    """
    proba = np.asarray(proba, dtype=float)
    if proba.ndim == 1 and n_classes == 2:
        proba = np.column_stack([1.0 - proba, proba])
    if proba.ndim != 2 or proba.shape != (n_rows, n_classes):
        raise ScoringError(
            f"predict_proba returned shape {tuple(proba.shape)}; expected ({n_rows}, {n_classes}): one row per "
            f"evaluated sample and one column per class (classes 0..{n_classes - 1}, as in y)."
        )
    if not np.all(np.isfinite(proba)):
        raise ScoringError("predict_proba returned NaN or infinite values.")
    return proba


def roc_auc(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """ROC AUC of `proba` (n, n_classes) against integer labels 0..n_classes-1.

    Binary: AUC of the class-1 column. Multiclass: one-vs-one macro average (Hand & Till), over the pairs of
    classes present in `y_true`. The pair loop is written out because scikit-learn's OvO refuses an evaluation
    part that lacks a class and scores whose rows do not sum to one; where both hold it gives the same number
    (a test checks this).
    """
    y_true = np.asarray(y_true)
    proba = as_probability_matrix(proba, len(y_true), n_classes)
    present = np.unique(y_true)
    if len(present) < 2:
        raise ScoringError("ROC AUC needs at least two classes among the evaluated rows.")
    if n_classes == 2:
        return float(roc_auc_score(y_true, proba[:, 1]))
    pair_scores = []
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            rows = (y_true == a) | (y_true == b)
            a_vs_b = roc_auc_score(y_true[rows] == a, proba[rows, a])
            b_vs_a = roc_auc_score(y_true[rows] == b, proba[rows, b])
            pair_scores.append((a_vs_b + b_vs_a) / 2.0)
    return float(np.mean(pair_scores))
