"""Attack metrics: token recovery, ROUGE-L, ROC AUC, membership advantage, and their chance levels.

Pure functions over tensors; nothing here knows about models. The chance levels are what an
attacker scores *without* reading the view, so "attack succeeds" means "clearly above chance":

- token recovery and ROUGE-L: the larger of the scores of :func:`blind_guess` (the victim's
  most frequent token guessed everywhere: the most an input-independent guess can expect; a
  uniform guess over a vocabulary of V tokens recovers 1/V) and of :func:`mismatched_rows`
  (the attack's own outputs scored against another row's text: ROUGE-L between unrelated texts
  is far from 0, since common tokens form long common subsequences);
- ROC AUC: 0.5;
- advantage (max TPR − FPR): :func:`null_advantage`, its mean over random member labels (the
  maximum over thresholds is biased upwards on finite samples, so its chance level is not 0);
- relative error of a recovered adapter (:func:`relative_error`): 1.0, the error of guessing
  the public initial adapter's ΔW = 0; a random guess of the right rank and norm
  (:func:`random_low_rank_guess`) scores about √2; cosine (:func:`cosine`): 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "token_recovery",
    "rouge_l",
    "mean_rouge_l",
    "blind_guess",
    "mismatched_rows",
    "roc_auc",
    "advantage",
    "null_advantage",
    "relative_error",
    "cosine",
    "random_low_rank_guess",
    "random_guess",
]


def token_recovery(pred: torch.Tensor, target: torch.Tensor, scored: torch.Tensor) -> float:
    """Fraction of scored positions whose token was recovered exactly.

    Args:
        pred: (B, T) recovered token ids.
        target: (B, T) true token ids.
        scored: (B, T) bool, the positions that count (real tokens, usually not special ones).

    Returns:
        The recovery rate in [0, 1] (0.0 when nothing is scored).
    """
    n = int(scored.sum())
    if n == 0:
        return 0.0
    return float((pred.eq(target) & scored).sum()) / n


def _lcs(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous line
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(pred: Sequence[int], target: Sequence[int]) -> float:
    """ROUGE-L F1 of two token sequences: the harmonic mean of LCS/len(pred) and LCS/len(target).

    Args:
        pred: Recovered tokens.
        target: True tokens.

    Returns:
        F1 in [0, 1]: 1 for identical sequences, 0 when no token is shared or one is empty.
    """
    lcs = _lcs(list(pred), list(target))
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(target)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(pred: torch.Tensor, target: torch.Tensor, scored: torch.Tensor) -> float:
    """Mean ROUGE-L F1 over rows, each row restricted to its scored positions.

    Args:
        pred: (B, T) recovered token ids.
        target: (B, T) true token ids.
        scored: (B, T) bool, the positions that count.

    Returns:
        The mean over rows that have at least one scored position (0.0 if none has).
    """
    values = [
        rouge_l(p[s].tolist(), t[s].tolist())
        for p, t, s in zip(pred, target, scored, strict=True)
        if bool(s.any())
    ]
    return sum(values) / len(values) if values else 0.0


def blind_guess(target: torch.Tensor, scored: torch.Tensor) -> int:
    """The best input-independent guess: the victim's most frequent scored token.

    Guessing it at every position scores the highest token recovery any attacker can expect
    without reading the view (a uniform guess over a vocabulary of V scores 1/V).

    Args:
        target: (..., T) true token ids.
        scored: Bool of the same shape, the positions that count.

    Returns:
        The token id.

    Raises:
        ValueError: Nothing is scored.
    """
    if not bool(scored.any()):
        raise ValueError("blind_guess: no scored position")
    return int(torch.mode(target[scored]).values)


def mismatched_rows(
    pred: torch.Tensor, target: torch.Tensor, scored: torch.Tensor, max_shifts: int = 16
) -> tuple[float, float]:
    """Token recovery and ROUGE-L of each row's prediction scored against *other* rows' text.

    What the attack's outputs score when they carry no information about the row they are
    compared with: the chance level of an attack whose output distribution is skewed (e.g.
    towards common tokens, which inflates ROUGE-L between unrelated texts).

    Args:
        pred: (R, T) recovered token ids, R >= 2.
        target: (R, T) true token ids.
        scored: (R, T) bool, the positions that count.
        max_shifts: Compare row i with rows i+1 .. i+s (cyclically), s = min(R − 1, this).

    Returns:
        ``(token recovery, mean ROUGE-L)`` over those pairs; recovery counts the positions
        scored in both rows of a pair.

    Raises:
        ValueError: Fewer than 2 rows.
    """
    if pred.shape[0] < 2:
        raise ValueError("mismatched_rows needs at least 2 rows")
    hits = counted = 0
    values = []
    for shift in range(1, min(pred.shape[0] - 1, max_shifts) + 1):
        other = target.roll(-shift, dims=0)  # row i + shift at row i
        other_scored = scored.roll(-shift, dims=0)
        both = scored & other_scored
        hits += int((pred.eq(other) & both).sum())
        counted += int(both.sum())
        values += [
            rouge_l(p[s].tolist(), t[o].tolist())
            for p, s, t, o in zip(pred, scored, other, other_scored, strict=True)
            if bool(s.any()) and bool(o.any())
        ]
    recovery = hits / counted if counted else 0.0
    return recovery, sum(values) / len(values) if values else 0.0


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties sharing their mean rank (float64)."""
    order = values.argsort()
    ordered = values[order]
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # last 1-based rank of each group of ties
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def _check_scores(
    scores: torch.Tensor, is_member: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(is_member).flatten().bool()
    if s.shape != y.shape:
        raise ValueError(f"{s.numel()} scores for {y.numel()} membership labels")
    if bool(y.all()) or not bool(y.any()):
        raise ValueError("membership labels need at least one member and one non-member")
    # an unreadable score (NaN) carries no information: it ties with every other one at -inf
    return torch.nan_to_num(s, nan=-torch.inf), y


def roc_auc(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    """Area under the ROC curve from ranks (Mann–Whitney U), ties counted as one half.

    Args:
        scores: (N,) attack scores, higher = "member"; NaN counts as the lowest score.
        is_member: (N,) bool ground truth.

    Returns:
        AUC in [0, 1]: 1 separates perfectly, 0.5 is chance.

    Raises:
        ValueError: Shapes differ, or one class is empty.
    """
    s, y = _check_scores(scores, is_member)
    ranks = _ranks(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def advantage(scores: torch.Tensor, is_member: torch.Tensor) -> float:
    """Membership advantage: max over thresholds of TPR − FPR (0 = no better than chance).

    Args:
        scores: (N,) attack scores, higher = "member"; NaN counts as the lowest score.
        is_member: (N,) bool ground truth.

    Returns:
        The best TPR − FPR over every threshold ``score >= t``, in [0, 1].

    Raises:
        ValueError: Shapes differ, or one class is empty.
    """
    s, y = _check_scores(scores, is_member)
    order = s.argsort(descending=True)
    ordered, members = s[order], y[order]
    tpr = members.cumsum(0).double() / int(y.sum())  # (N,) with the threshold at each score
    fpr = (~members).cumsum(0).double() / int((~y).sum())
    group_end = torch.ones_like(members)  # a threshold takes all tied scores or none
    group_end[:-1] = ordered[1:] != ordered[:-1]
    return max(0.0, float((tpr - fpr)[group_end].max()))


def null_advantage(
    scores: torch.Tensor, is_member: torch.Tensor, generator: torch.Generator, trials: int = 200
) -> float:
    """Chance level of :func:`advantage`: its mean when member labels are shuffled at random.

    Args:
        scores: (N,) attack scores.
        is_member: (N,) bool ground truth (only the number of members is used).
        generator: Source of the shuffles.
        trials: Number of shuffles.

    Returns:
        The mean advantage of an attack whose scores carry no membership information.
    """
    y = torch.as_tensor(is_member).flatten().bool()
    total = 0.0
    for _ in range(trials):
        total += advantage(scores, y[torch.randperm(y.numel(), generator=generator)])
    return total / trials


def _paired(
    est: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(est) != set(true):
        raise ValueError(f"estimate and truth name different maps: {sorted(set(est) ^ set(true))}")
    names = sorted(true)
    flat = [torch.cat([d[n].double().flatten() for n in names]) for d in (est, true)]
    return flat[0], flat[1]


def relative_error(est: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> float:
    """‖est − true‖ / ‖true‖ (Frobenius, over all maps together).

    Args:
        est: ``name -> recovered matrix`` (e.g. a LoRA ΔW).
        true: ``name -> true matrix``, the same names and shapes.

    Returns:
        0 for an exact recovery, 1.0 for the zero guess; ``inf`` when ``true`` is all zero.

    Raises:
        ValueError: The two name different maps.
    """
    e, t = _paired(est, true)
    norm = float(t.norm())
    return float((e - t).norm()) / norm if norm > 0 else float("inf")


def cosine(est: Mapping[str, torch.Tensor], true: Mapping[str, torch.Tensor]) -> float:
    """Cosine between the two, all maps flattened together (0.0 if either is zero).

    Raises:
        ValueError: The two name different maps.
    """
    e, t = _paired(est, true)
    norms = float(e.norm()) * float(t.norm())
    return float(e @ t) / norms if norms > 0 else 0.0


def random_low_rank_guess(
    true: Mapping[str, torch.Tensor], rank: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per map, a Gaussian rank-``rank`` matrix with the true matrix's norm: a guess that knows
    the size of the secret and nothing else.

    Args:
        true: ``name -> (out, in)`` true matrices.
        rank: The guesses' rank.
        generator: Source of the draws.

    Returns:
        ``name -> (out, in)`` float64.
    """
    out = {}
    for name, t in true.items():
        left = torch.randn(t.shape[0], rank, generator=generator, dtype=torch.float64)
        right = torch.randn(rank, t.shape[1], generator=generator, dtype=torch.float64)
        guess = left @ right
        out[name] = guess * (float(t.double().norm()) / float(guess.norm()))
    return out


def random_guess(
    true: Mapping[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Per tensor, a Gaussian one with the true tensor's shape and norm (a full-rank guess that
    knows the size of the secret and nothing else; relative error about √2).

    Args:
        true: ``name -> tensor`` true values (e.g. a prefix's change).
        generator: Source of the draws.

    Returns:
        ``name -> tensor`` float64.
    """
    out = {}
    for name, t in true.items():
        guess = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[name] = guess * (float(t.double().norm()) / float(guess.norm()))
    return out
