"""Evaluation metrics in plain Python: accuracy, macro-F1, confusion matrix, perplexity.

Predictions and labels may be lists, tuples or 1-D tensors / arrays of class indices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["accuracy", "confusion_matrix", "macro_f1", "macro_f1_from_confusion", "perplexity"]


def _as_list(values: Iterable[Any] | Any, what: str) -> list[int]:
    if hasattr(values, "tolist"):  # torch.Tensor, numpy.ndarray
        values = values.tolist()
    out = list(values)
    if any(isinstance(v, (list, tuple)) for v in out):
        raise ValueError(f"{what} must be one class index per item (1-D), got nested values")
    return [int(v) for v in out]


def _pair(preds: Any, labels: Any) -> tuple[list[int], list[int]]:
    p, y = _as_list(preds, "preds"), _as_list(labels, "labels")
    if len(p) != len(y):
        raise ValueError(f"preds has {len(p)} items but labels has {len(y)}")
    if not p:
        raise ValueError("cannot score zero predictions")
    return p, y


def accuracy(preds: Sequence[int] | Any, labels: Sequence[int] | Any) -> float:
    """Share of predictions equal to the label.

    Args:
        preds: Predicted class indices.
        labels: True class indices, same length.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: Different lengths, or no items.
    """
    p, y = _pair(preds, labels)
    return sum(a == b for a, b in zip(p, y, strict=True)) / len(p)


def confusion_matrix(
    preds: Sequence[int] | Any, labels: Sequence[int] | Any, num_labels: int
) -> list[list[int]]:
    """Count (true, predicted) pairs.

    Args:
        preds: Predicted class indices.
        labels: True class indices, same length.
        num_labels: Number of classes K; indices must lie in ``0..K-1``.

    Returns:
        A K x K matrix ``m`` with ``m[true][pred]`` counts.

    Raises:
        ValueError: Different lengths, no items, or an index outside ``0..K-1``.
    """
    p, y = _pair(preds, labels)
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    m = [[0] * num_labels for _ in range(num_labels)]
    for a, b in zip(p, y, strict=True):
        if not (0 <= a < num_labels and 0 <= b < num_labels):
            raise ValueError(
                f"class index out of range 0..{num_labels - 1}: prediction {a}, label {b}"
            )
        m[b][a] += 1
    return m


def macro_f1(preds: Sequence[int] | Any, labels: Sequence[int] | Any, num_labels: int) -> float:
    """Unweighted mean of the per-class F1 scores.

    Classes that occur in neither the predictions nor the labels are left out of the mean
    (as scikit-learn's ``f1_score(average="macro")`` does, which only sees present classes);
    a class that occurs in only one of them scores 0.

    Args:
        preds: Predicted class indices.
        labels: True class indices, same length.
        num_labels: Number of classes K; indices must lie in ``0..K-1``.

    Returns:
        Macro-F1 in [0, 1].

    Raises:
        ValueError: Different lengths, no items, or an index outside ``0..K-1``.
    """
    return macro_f1_from_confusion(confusion_matrix(preds, labels, num_labels))


def macro_f1_from_confusion(m: Sequence[Sequence[int]]) -> float:
    """Macro-F1 of a K x K confusion matrix ``m[true][pred]`` (as :func:`macro_f1`).

    Confusion matrices add up over disjoint parts of a split, so the sum of the parts' matrices
    gives the macro-F1 of the whole split (a mean of the parts' macro-F1 does not).

    Raises:
        ValueError: Not square, a negative count, or no items.
    """
    k = len(m)
    if k == 0 or any(len(row) != k for row in m):
        raise ValueError(f"a confusion matrix must be K x K, got rows of {[len(r) for r in m]}")
    if any(v < 0 for row in m for v in row):
        raise ValueError("a confusion matrix cannot hold a negative count")
    if sum(map(sum, m)) == 0:
        raise ValueError("cannot score zero predictions")
    scores = []
    for c in range(k):
        tp = m[c][c]
        fn = sum(m[c]) - tp
        fp = sum(m[r][c] for r in range(k)) - tp
        if tp + fn + fp == 0:
            continue  # absent from both
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def perplexity(mean_nll: float) -> float:
    """Perplexity from a mean negative log-likelihood per token (natural log).

    Args:
        mean_nll: Mean cross-entropy in nats per token.

    Returns:
        ``exp(mean_nll)``; ``inf`` when that overflows.

    Raises:
        ValueError: ``mean_nll`` is negative or NaN.
    """
    value = float(mean_nll)
    if math.isnan(value) or value < 0:
        raise ValueError(f"mean_nll must be a non-negative number, got {mean_nll!r}")
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
