"""Loss-threshold membership inference on a visible update (surface ``update``).

In plain FedAvg the update a client uploads *is* its locally trained adapter. The host loads it
into its shadow copy of the client and scores each candidate by its negated loss: a model fits
the examples it was trained on better than others (Yeom et al., CSF 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from shieldtune.attacks._shadow import Shadow
from shieldtune.attacks.base import register_attack

__all__ = ["build_loss_attack"]


def build_loss_attack(
    shadow: Shadow,
    global_state: Mapping[str, torch.Tensor],
    candidates: dict[str, torch.Tensor],
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """Score candidates by −loss under the viewed update.

    Args:
        shadow: The attacker's copy of the client.
        global_state: The adapter the client started from (unused: the update is the model).
        candidates: Encoded candidate examples (with labels), N rows.

    Returns:
        ``scorer(update) -> (N,) float64``, higher = more likely a member.
    """
    del global_state

    def scorer(update: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shadow.load(update)
        return -shadow.losses(candidates)  # (N,)

    return scorer


register_attack(
    name="mia-loss",
    surface="update",
    summary="membership by low loss under the client's uploaded adapter (loss threshold)",
    build=build_loss_attack,
)
