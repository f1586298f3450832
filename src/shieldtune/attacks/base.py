"""What an attack is, what it reads, and the closed registry of attacks.

An attack is built once from what its attacker legitimately knows (the public model and
adapter code, public text, the seeded initial adapter) and then applied to *views*: what the
attacker actually sees in a mode. The same built attack runs on the plain view and on the
protected view, so the two numbers compare the protection, not two attacks.

Surfaces (what the attacker reads):

- ``cut-activations`` (Method 2, split): the cut-layer hidden states a client sends. Built by
  ``build(front, public, *, seed) -> Inverter``; an :class:`Inverter` maps a (B, T, d) view to
  (B, T) token ids.
- ``update`` (federated): one client's visible update (LoRA tensors, SPF values + indices, the
  head). Built by ``build(shadow, global_state, candidates) -> MembershipScorer``; a
  :class:`MembershipScorer` maps a viewed update to one score per candidate example (higher =
  "was in the training set").
- ``accelerator`` (Method 1): the operands the untrusted accelerator receives for every
  offloaded frozen linear map, in order, decoded as that worker reads them (the field
  elements, centred). Built by ``build(model, adapter, *, task, num_labels, seed, w_bits) ->
  AdapterExtractor`` from the public model, the adapter's settings (method, targets, rank,
  alpha; a prefix's length) and the public seed; an :class:`AdapterExtractor` maps forward
  passes (``{map id: (n, d_in) operand rows}``, one adapter state) and each pass's (B, T)
  padding mask (the batch layout) to ``{name: recovered tensor}``: a LoRA map's ΔW, a prefix
  layer's change of keys and of values. An extractor may also offer ``scores(est, guess,
  state, holdout)``, rows of its own metrics (``prefix-extraction``: the recovered prefix's
  effect on held-out tokens).

Adding an attack: one module ``attacks/<name>.py`` ending with one :func:`register_attack`
call, imported in ``attacks/__init__.py``; its tests show it succeeds on the plain mode and
drops to chance on the protected one. A new surface adds a literal to :data:`Surface` and its own
build signature, documented above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from shieldtune.registry import Registry

__all__ = [
    "Surface",
    "SURFACES",
    "Inverter",
    "MembershipScorer",
    "AdapterExtractor",
    "Attack",
    "ATTACKS",
    "register_attack",
    "attacks_on",
]

Surface = Literal["cut-activations", "update", "accelerator"]
SURFACES: tuple[str, ...] = ("cut-activations", "update", "accelerator")


class Inverter(Protocol):
    """A built hidden-state inversion attack."""

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map (B, T, d) viewed hidden states to (B, T) recovered token ids."""
        ...


class MembershipScorer(Protocol):
    """A built membership-inference attack over fixed candidate examples."""

    def __call__(self, update: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map a viewed update to (N,) float64 scores, one per candidate (higher = member)."""
        ...


class AdapterExtractor(Protocol):
    """A built adapter-extraction attack on what a Method 1 accelerator receives."""

    rank: int  # the adapter's rank (a random guess of that rank is a chance level; 0: full)

    def __call__(
        self,
        passes: Sequence[Mapping[int, torch.Tensor]],
        masks: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Map forward passes under one adapter state (and each pass's (B, T) padding mask) to
        ``{name: recovered change}`` (float64; a LoRA map's (out, in) ΔW)."""
        ...

    def deltas(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The true changes it recovers, named as its estimates, from an adapter state."""
        ...


@dataclass(frozen=True)
class Attack:
    """A registered attack.

    Attributes:
        name: Registry name.
        surface: What the attacker reads (see the module docstring).
        summary: One line: what the attacker does.
        build: Builds the attack from the attacker's knowledge (signature per surface).
    """

    name: str
    surface: Surface
    summary: str
    build: Callable[..., Any]


ATTACKS: Registry[Attack] = Registry("attack")


def register_attack(
    *, name: str, surface: Surface, summary: str, build: Callable[..., Any]
) -> Attack:
    """Register an attack (called once, at the end of its module).

    Raises:
        ValueError: Malformed or duplicate name, or an unknown surface (a programming error).
    """
    if surface not in SURFACES:
        raise ValueError(f"attack {name!r}: surface {surface!r} unknown; accepted: {SURFACES}")
    return ATTACKS.register(name, Attack(name, surface, summary, build))


def attacks_on(surface: Surface) -> list[str]:
    """Names of the registered attacks that read ``surface``, sorted."""
    return [name for name in ATTACKS if ATTACKS.get(name).surface == surface]
