"""Gradient-alignment membership inference on a visible update (surface ``update``).

Local training moves the adapter against the gradients of the client's own examples, so the
update Δ = θ_update − θ_global points along −∇L(x) for a member x more than for a non-member.
The host scores each candidate by cos(−∇_θ L(x; θ_global), Δ), with the gradient taken in its
shadow copy of the client at the global adapter it sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from shieldtune.attacks._shadow import Shadow
from shieldtune.attacks.base import register_attack

__all__ = ["build_gradient_attack"]


def build_gradient_attack(
    shadow: Shadow,
    global_state: Mapping[str, torch.Tensor],
    candidates: dict[str, torch.Tensor],
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """Precompute the candidates' gradients at the global adapter.

    Args:
        shadow: The attacker's copy of the client.
        global_state: The adapter the client started from.
        candidates: Encoded candidate examples (with labels), N rows.

    Returns:
        ``scorer(update) -> (N,) float64`` cosine alignments, higher = more likely a member.
    """
    shadow.load(global_state)
    descent = -shadow.gradients(candidates)  # (N, P)
    start = shadow.flat_params()  # (P,)

    def scorer(update: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shadow.load(update)
        delta = shadow.flat_params() - start  # (P,)
        return F.cosine_similarity(descent, delta[None, :], dim=1)  # (N,)

    return scorer


register_attack(
    name="mia-gradient",
    surface="update",
    summary="membership by alignment of a candidate's gradient with the update direction",
    build=build_gradient_attack,
)
