"""The null inversion attack: it ignores the view (surface ``cut-activations``).

It guesses the most frequent token of the attacker's public text at every position: what an
attacker scores from prior knowledge alone. Real attacks are measured against it (and against
the oracle blind guess of :func:`~shieldtune.attacks.metrics.blind_guess`).
"""

from __future__ import annotations

import torch

from shieldtune.attacks.base import register_attack
from shieldtune.models import ModelSlice

__all__ = ["PriorGuess", "build_prior_guess"]


class PriorGuess:
    """Predicts one fixed token everywhere.

    Args:
        token: The token id to guess.
    """

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T) filled with the guessed token."""
        return torch.full(hidden.shape[:2], self.token, dtype=torch.long)


def build_prior_guess(
    front: ModelSlice, public: dict[str, torch.Tensor], *, seed: int = 0
) -> PriorGuess:
    """The most frequent real token of the public text.

    Args:
        front: Unused (the attack reads nothing); part of the common build signature.
        public: Encoded public text (``input_ids``, ``attention_mask``).
        seed: Unused.

    Returns:
        The null inverter.
    """
    del front, seed
    real = public["input_ids"][public["attention_mask"].bool()]
    return PriorGuess(int(torch.mode(real).values))


register_attack(
    name="prior-guess",
    surface="cut-activations",
    summary="null attack: the public text's most frequent token everywhere (reads nothing)",
    build=build_prior_guess,
)
