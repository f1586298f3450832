"""Task losses: cross-entropy over classes, or over answer tokens of a causal LM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["task_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean cross-entropy of a batch.

    Args:
        logits: (B, C) class logits, or (B, T, V) token logits for ``causal-lm``.
        labels: (B,) class ids, or (B, T) token ids with -100 where no loss is taken
            (prompt, padding); token labels are shifted here, as transformers does.
        task: ``"seq-cls"`` or ``"causal-lm"``.

    Returns:
        Scalar float32 loss.
    """
    if task == "seq-cls":
        return F.cross_entropy(logits.float(), labels)
    shifted = logits[:, :-1].float()  # (B, T-1, V) predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
