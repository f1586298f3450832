"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from shieldtune.data import (
    accuracy,
    confusion_matrix,
    macro_f1,
    macro_f1_from_confusion,
    perplexity,
)

# 8 items, 4 classes; class 3 occurs nowhere.
#   class 0: TP 2 (items 0, 1), FN 1 (item 2 -> 1), FP 1 (item 6: 2 -> 0)  F1 = 4/6 = 2/3
#   class 1: TP 1 (item 3), FN 0, FP 2 (items 2, 7)                        F1 = 2/4 = 1/2
#   class 2: TP 2 (items 4, 5), FN 2 (items 6, 7), FP 0                    F1 = 4/6 = 2/3
#   macro over the 3 present classes = (2/3 + 1/2 + 2/3) / 3 = 11/18
LABELS = [0, 0, 0, 1, 2, 2, 2, 2]
PREDS = [0, 0, 1, 1, 2, 2, 0, 1]


def test_accuracy_hand_computed() -> None:
    assert accuracy(PREDS, LABELS) == pytest.approx(5 / 8)
    assert accuracy(torch.tensor(PREDS), torch.tensor(LABELS)) == pytest.approx(5 / 8)


def test_confusion_matrix_rows_are_true_classes() -> None:
    m = confusion_matrix(PREDS, LABELS, num_labels=4)

    assert m == [[2, 1, 0, 0], [0, 1, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]


def test_macro_f1_hand_computed_and_skips_absent_classes() -> None:
    assert macro_f1(PREDS, LABELS, num_labels=4) == pytest.approx(11 / 18)
    assert macro_f1(PREDS, LABELS, num_labels=3) == pytest.approx(11 / 18)


def test_macro_f1_counts_a_class_only_predicted() -> None:
    # class 1 is predicted once but never true: F1 0; class 0: TP 1, FN 1 -> 2/3
    assert macro_f1([0, 1], [0, 0], num_labels=2) == pytest.approx((2 / 3 + 0.0) / 2)
    assert macro_f1([1, 1], [1, 1], num_labels=5) == 1.0


def test_macro_f1_matches_sklearn_when_available() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (200,), generator=g).tolist()
    labels = torch.randint(0, 4, (200,), generator=g).tolist()

    ours = macro_f1(preds, labels, num_labels=6)

    assert ours == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))


def test_metric_input_errors() -> None:
    with pytest.raises(ValueError, match="preds has 2 items but labels has 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="zero predictions"):
        macro_f1([], [], 2)
    with pytest.raises(ValueError, match="out of range"):
        macro_f1([0, 5], [0, 1], 2)


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(-0.1)


def test_confusion_matrices_of_parts_add_up_to_the_whole_macro_f1() -> None:
    parts = [(PREDS[:3], LABELS[:3]), (PREDS[3:], LABELS[3:])]
    mats = [confusion_matrix(p, y, 4) for p, y in parts]
    summed = [[a + b for a, b in zip(r0, r1, strict=True)] for r0, r1 in zip(*mats, strict=True)]

    assert macro_f1_from_confusion(summed) == pytest.approx(11 / 18)
    mean_of_parts = sum(macro_f1(p, y, 4) * len(p) for p, y in parts) / len(PREDS)
    assert mean_of_parts != pytest.approx(11 / 18)  # why a federated server sums matrices


def test_macro_f1_from_confusion_refuses_bad_matrices() -> None:
    with pytest.raises(ValueError, match="K x K"):
        macro_f1_from_confusion([[1, 0], [0]])
    with pytest.raises(ValueError, match="negative"):
        macro_f1_from_confusion([[1, -1], [0, 1]])
    with pytest.raises(ValueError, match="zero predictions"):
        macro_f1_from_confusion([[0, 0], [0, 0]])
