"""Learned inversion of cut-layer hidden states (surface ``cut-activations``).

The attacker runs the public front slice over *public* text (never the victim's) and trains a
small per-position model, a 2-layer MLP from the hidden size to token logits, to name the token
behind each hidden state. Its output classes are the tokens seen in the public text: a token the
attacker never saw cannot be named, so coverage of the public text bounds this attack (the
nearest-neighbour attack also covers the vocabulary fed alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shieldtune.attacks._front import front_states
from shieldtune.attacks.base import register_attack
from shieldtune.models import ModelSlice

__all__ = ["LearnedInverter", "train_inverter", "build_learned_inverter"]


class LearnedInverter(nn.Module):
    """Standardise, then a 2-layer MLP to logits over the known tokens.

    Args:
        hidden_size: d of the cut-layer hidden states.
        classes: (K,) the token ids the output units stand for.
        mean: (d,) feature means of the training states.
        std: (d,) feature standard deviations of the training states.
        width: Units of the hidden layer.
    """

    def __init__(
        self,
        hidden_size: int,
        classes: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        width: int = 256,
    ) -> None:
        super().__init__()
        self.register_buffer("classes", classes)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, classes.numel())
        )

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(M, d) hidden states -> (M, K) logits."""
        return self.mlp((states.float() - self.mean) / self.std)  # (M, K)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, T, d) hidden states -> (B, T) token ids."""
        b, t, d = hidden.shape
        best = self.logits(hidden.reshape(b * t, d)).argmax(dim=1)  # (B·T,)
        return self.classes[best].reshape(b, t)  # (B, T)


def train_inverter(
    states: torch.Tensor,
    ids: torch.Tensor,
    *,
    seed: int,
    width: int = 256,
    epochs: int = 5,
    lr: float = 2e-3,
    batch_size: int = 256,
) -> LearnedInverter:
    """Fit a :class:`LearnedInverter` on (hidden state, token) pairs with Adam.

    Args:
        states: (M, d) public hidden states.
        ids: (M,) their token ids.
        seed: Seed of initialisation and shuffling (global random state is left as it was).
        width: Units of the hidden layer.
        epochs: Passes over the pairs.
        lr: Adam learning rate.
        batch_size: Pairs per step.

    Returns:
        The trained inverter, in eval mode.
    """
    classes, targets = torch.unique(ids, return_inverse=True)  # (K,), (M,)
    mean, std = states.mean(0), states.std(0) + 1e-6  # (d,), (d,)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LearnedInverter(states.shape[1], classes, mean, std, width)
    optim = torch.optim.Adam(model.mlp.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(states.shape[0], generator=gen)  # (M,)
        for i in range(0, states.shape[0], batch_size):
            rows = order[i : i + batch_size]
            loss = F.cross_entropy(model.logits(states[rows]), targets[rows])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return model.eval()


def build_learned_inverter(
    front: ModelSlice,
    public: dict[str, torch.Tensor],
    *,
    seed: int = 0,
    batch_size: int = 32,
    width: int = 256,
    epochs: int = 5,
) -> LearnedInverter:
    """Train the inverter on the public text's hidden states at this cut.

    Args:
        front: The public front slice (embeddings + layers 1..k).
        public: Encoded public text (``input_ids``, ``attention_mask``), not the victim's.
        seed: Training seed.
        batch_size: Rows per forward pass over the public text.
        width: Units of the MLP's hidden layer.
        epochs: Passes over the public hidden states.

    Returns:
        The trained inverter.
    """
    states, ids = front_states(front, public, batch_size)
    return train_inverter(states, ids, seed=seed, width=width, epochs=epochs)


register_attack(
    name="learned-inversion",
    surface="cut-activations",
    summary="MLP from hidden state to token, trained on public text through the public front",
    build=build_learned_inverter,
)
