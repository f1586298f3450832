"""Nearest-neighbour inversion of cut-layer hidden states (surface ``cut-activations``).

The attacker builds a dictionary of hidden states whose tokens it knows, all computed by the
public front slice (the same weights the client runs):

- every vocabulary token fed alone (:func:`~shieldtune.attacks._front.vocabulary_states`): full
  vocabulary coverage; at cut 0 this is the public embedding matrix (plus position 0);
- every position of public text in context (:func:`~shieldtune.attacks._front.front_states`):
  covers how layers 1..k move a token's state with its neighbours and position.

Each viewed hidden vector is mapped to the token of its nearest dictionary row by cosine
similarity. Nothing is trained; the attack is as strong as the front slice is close to
injective per token, which is why shallow cuts leak most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shieldtune.attacks._front import front_states, vocabulary_states
from shieldtune.attacks.base import register_attack
from shieldtune.models import ModelSlice

__all__ = ["NearestNeighbourInverter", "build_nn_inverter"]


class NearestNeighbourInverter:
    """Maps hidden vectors to the token of the most cosine-similar dictionary row.

    Args:
        keys: (M, d) dictionary hidden states.
        ids: (M,) their token ids.
        chunk: Query rows compared at once (bounds memory to chunk × M floats).
    """

    def __init__(self, keys: torch.Tensor, ids: torch.Tensor, chunk: int = 512) -> None:
        self.keys = F.normalize(keys.float(), dim=-1)  # (M, d)
        self.ids = ids
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) hidden states -> (B, T) token ids."""
        b, t, d = hidden.shape
        queries = F.normalize(hidden.reshape(b * t, d).float(), dim=-1)  # (B·T, d)
        best = [
            (queries[i : i + self.chunk] @ self.keys.T).argmax(dim=1)  # (c,)
            for i in range(0, b * t, self.chunk)
        ]
        return self.ids[torch.cat(best)].reshape(b, t)  # (B, T)


def build_nn_inverter(
    front: ModelSlice, public: dict[str, torch.Tensor], *, seed: int = 0, batch_size: int = 32
) -> NearestNeighbourInverter:
    """The dictionary of public hidden states at this cut: vocabulary alone + public text.

    Args:
        front: The public front slice (embeddings + layers 1..k).
        public: Encoded public text (``input_ids``, ``attention_mask``), not the victim's.
        seed: Unused (the attack is deterministic); part of the common build signature.
        batch_size: Rows per forward pass over the public text.

    Returns:
        The inverter.
    """
    del seed
    vocab_keys, vocab_ids = vocabulary_states(front, int(front.config.vocab_size))
    text_keys, text_ids = front_states(front, public, batch_size)
    return NearestNeighbourInverter(
        torch.cat([vocab_keys, text_keys]), torch.cat([vocab_ids, text_ids])
    )


register_attack(
    name="nn-inversion",
    surface="cut-activations",
    summary="nearest public hidden state (cosine) over the vocabulary alone and public text",
    build=build_nn_inverter,
)
