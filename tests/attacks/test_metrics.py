"""Attack metrics against hand-computed values and their definitions."""

from __future__ import annotations

import pytest
import torch

from shieldtune.attacks.metrics import (
    advantage,
    blind_guess,
    mean_rouge_l,
    mismatched_rows,
    null_advantage,
    roc_auc,
    rouge_l,
    token_recovery,
)


def test_rouge_l_of_identical_disjoint_and_partial_sequences() -> None:
    assert rouge_l([5, 6, 7, 8], [5, 6, 7, 8]) == 1.0
    assert rouge_l([1, 2, 3], [4, 5, 6]) == 0.0
    assert rouge_l([], [1, 2]) == 0.0
    # LCS of ABCBDAB / BDCABA is 4 (e.g. BCBA): P = 4/7, R = 4/6, F1 = 2PR / (P + R) = 8/13
    a, b = [1, 2, 3, 2, 4, 1, 2], [2, 4, 3, 1, 2, 1]
    assert rouge_l(a, b) == pytest.approx(8 / 13)
    assert rouge_l(a, b) == rouge_l(b, a)  # F1 is symmetric
    # order matters: a reversed sequence shares only a subsequence of length 1
    assert rouge_l([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(0.25)


def test_token_recovery_and_rouge_count_only_scored_positions() -> None:
    target = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    pred = torch.tensor([[3, 9, 5, 0], [6, 7, 9, 9]])
    scored = target != 0
    assert token_recovery(pred, target, scored) == pytest.approx(4 / 5)
    assert mean_rouge_l(pred, target, scored) == pytest.approx((2 / 3 + 1.0) / 2)
    assert token_recovery(pred, target, torch.zeros_like(scored)) == 0.0


def test_chance_levels_of_inversion() -> None:
    target = torch.tensor([[1, 1, 2, 3], [1, 4, 1, 5]])
    scored = torch.ones_like(target, dtype=torch.bool)
    assert blind_guess(target, scored) == 1
    with pytest.raises(ValueError, match="no scored position"):
        blind_guess(target, torch.zeros_like(scored))
    # predicting each row perfectly is chance-level against the *other* row's text
    recovery, rouge = mismatched_rows(target, target, scored)
    assert recovery == pytest.approx(2 / 8)  # positions 0 and 2 hold 1 in both rows
    assert rouge == pytest.approx(rouge_l([1, 1, 2, 3], [1, 4, 1, 5]))
    # with more rows every other row is a comparison (here: 3 rows, 2 shifts, 6 pairs)
    three = torch.tensor([[1, 2], [3, 4], [1, 4]])
    recovery, _ = mismatched_rows(three, three, torch.ones_like(three, dtype=torch.bool))
    assert recovery == pytest.approx(4 / 12)  # (0,2): pos 0; (1,2): pos 1; both ways


def test_auc_matches_its_pairwise_definition_and_handles_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=gen).double()  # many ties
    member = torch.rand(40, generator=gen) < 0.5
    pos, neg = scores[member], scores[~member]
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None])).mean()
    assert roc_auc(scores, member) == pytest.approx(float(pairwise))
    ordered = torch.arange(10.0)
    truth = ordered >= 5
    assert roc_auc(ordered, truth) == 1.0 and roc_auc(-ordered, truth) == 0.0
    assert roc_auc(torch.zeros(10), truth) == 0.5
    assert roc_auc(torch.full((10,), float("nan")), truth) == 0.5  # unreadable scores: chance
    with pytest.raises(ValueError, match="one member and one non-member"):
        roc_auc(ordered, torch.ones(10, dtype=torch.bool))


def test_advantage_and_its_chance_level() -> None:
    ordered = torch.arange(10.0)
    truth = ordered >= 5
    assert advantage(ordered, truth) == 1.0
    assert advantage(-ordered, truth) == 0.0  # never below 0: "say nobody" is a threshold
    # ties: the threshold takes both tied scores or neither (best is TPR 1, FPR 1/2)
    assert advantage(torch.tensor([1.0, 1.0, 0.0, 2.0]), torch.tensor([0, 1, 0, 1])) == 0.5
    noise = torch.randn(64, generator=torch.Generator().manual_seed(1))
    members = torch.arange(64) < 32
    null = null_advantage(noise, members, torch.Generator().manual_seed(2), trials=100)
    assert 0.05 < null < 0.4  # a max over thresholds is biased upwards on finite samples
