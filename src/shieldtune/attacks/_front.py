"""What the public front slice computes for public inputs: the inversion attacks' training data.

The attacker holds the same public pre-trained weights as the client, so it can run the front
slice (embeddings + layers 1..k) on any text it likes. Both inversion attacks learn from these
pairs (hidden state at a position, token at that position).
"""

from __future__ import annotations

import torch

from shieldtune.models import ModelSlice

__all__ = ["front_states", "vocabulary_states"]


@torch.no_grad()
def front_states(
    front: ModelSlice, public: dict[str, torch.Tensor], batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every real token of public text, in context.

    Args:
        front: The public front slice (run in eval mode; its mode is restored).
        public: Encoded public text: ``input_ids`` and ``attention_mask`` (N, T).
        batch_size: Rows per forward pass.

    Returns:
        ``(states (M, d) float32, token ids (M,))`` over the M real (unpadded) positions.
    """
    was_training = front.training
    front.eval()
    states, ids = [], []
    for i in range(0, public["input_ids"].shape[0], batch_size):
        x = public["input_ids"][i : i + batch_size]  # (b, T)
        mask = public["attention_mask"][i : i + batch_size]  # (b, T)
        hidden = front(x, mask)  # (b, T, d)
        real = mask.bool()  # (b, T)
        states.append(hidden[real].float())  # (m, d)
        ids.append(x[real])  # (m,)
    front.train(was_training)
    return torch.cat(states), torch.cat(ids)


@torch.no_grad()
def vocabulary_states(
    front: ModelSlice, vocab_size: int, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state of every vocabulary token fed alone (a one-token input at position 0).

    At cut 0 of a model without absolute positions this is the input embedding matrix itself.

    Args:
        front: The public front slice (run in eval mode; its mode is restored).
        vocab_size: Number of token ids.
        batch_size: Tokens per forward pass.

    Returns:
        ``(states (V, d) float32, token ids (V,))``.
    """
    was_training = front.training
    front.eval()
    ids = torch.arange(vocab_size)  # (V,)
    states = []
    for i in range(0, vocab_size, batch_size):
        x = ids[i : i + batch_size, None]  # (b, 1)
        states.append(front(x, torch.ones_like(x))[:, 0].float())  # (b, d)
    front.train(was_training)
    return torch.cat(states), ids
