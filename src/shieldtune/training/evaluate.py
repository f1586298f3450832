"""Evaluation through a forward function: accuracy / macro-F1 or answer loss / perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from shieldtune.data.metrics import accuracy, confusion_matrix, macro_f1_from_confusion
from shieldtune.data.tasks import batches
from shieldtune.training.losses import task_loss

__all__ = ["evaluate"]

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def evaluate(
    forward: Forward,
    encoded: dict[str, torch.Tensor],
    task: str,
    batch_size: int,
    num_labels: int | None = None,
    *,
    confusion: bool = False,
) -> dict[str, Any]:
    """Evaluate a model given as ``forward(batch) -> logits`` on an encoded split.

    Args:
        forward: Maps a batch dict to logits (the same path training uses).
        encoded: The split's tensors (input_ids, attention_mask, labels...).
        task: ``"seq-cls"`` or ``"causal-lm"``.
        batch_size: Rows per forward.
        num_labels: Number of classes (seq-cls).
        confusion: Also return ``"confusion"`` (seq-cls): the K x K matrix ``m[true][pred]``
            flattened row by row, K² counts; matrices of disjoint parts add up (a federated
            server sums its clients' to score the whole test split).

    Returns:
        ``{"loss", "accuracy", "macro_f1"}`` for seq-cls; ``{"loss", "perplexity"}`` for LMs.
    """
    total, weight = 0.0, 0
    preds: list[int] = []
    for batch in batches(encoded, batch_size, shuffle=False):
        logits = forward(batch)
        if task == "seq-cls":
            n = batch["labels"].shape[0]
            preds.extend(logits.argmax(-1).tolist())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(task_loss(logits, batch["labels"], task)) * n
        weight += n
    loss = total / max(weight, 1)
    if task == "seq-cls":
        labels = encoded["labels"].tolist()
        m = confusion_matrix(preds, labels, num_labels)  # (K, K) row = true class
        metrics: dict[str, Any] = {
            "loss": loss,
            "accuracy": accuracy(preds, labels),
            "macro_f1": macro_f1_from_confusion(m),
        }
        if confusion:
            metrics["confusion"] = [n for row in m for n in row]  # (K·K,)
        return metrics
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
