"""Attacks: measured leakage of each mode, from what its attacker really sees.

One module per attack, each ending with one :func:`register_attack` call into the closed
registry :data:`ATTACKS`:

- ``nn-inversion`` (:mod:`~shieldtune.attacks.nn_inversion`), ``learned-inversion``
  (:mod:`~shieldtune.attacks.learned_inversion`) and the null ``prior-guess``
  (:mod:`~shieldtune.attacks.prior_guess`): token recovery from split fine-tuning's cut-layer
  hidden states;
- ``mia-loss`` (:mod:`~shieldtune.attacks.mia_loss`) and ``mia-gradient``
  (:mod:`~shieldtune.attacks.mia_gradient`): membership inference from a client's visible
  update, with and without the DP option (:mod:`~shieldtune.attacks.dp`);
- ``lora-extraction`` (:mod:`~shieldtune.attacks.adapter_extraction`) and
  ``prefix-extraction`` (:mod:`~shieldtune.attacks.prefix_extraction`): LoRA deltas and
  P-tuning v2 prefixes from the operands a Method 1 accelerator receives.

:mod:`~shieldtune.attacks.views` reads tensors out of captured bytes as an attacker can,
:mod:`~shieldtune.attacks.capture` captures each mode's view where its attacker sits,
:mod:`~shieldtune.attacks.metrics` scores, :mod:`~shieldtune.attacks.runner` runs the suite
(:func:`run_attacks`). The runner and capture modules start enclaves and gRPC servers; import
them directly (this ``__init__`` keeps to the attacks and the registry).
"""

from shieldtune.attacks import (  # noqa: F401  (each module registers its attacks)
    adapter_extraction,
    learned_inversion,
    mia_gradient,
    mia_loss,
    nn_inversion,
    prefix_extraction,
    prior_guess,
)
from shieldtune.attacks.base import (
    ATTACKS,
    SURFACES,
    AdapterExtractor,
    Attack,
    Inverter,
    MembershipScorer,
    Surface,
    attacks_on,
    register_attack,
)
from shieldtune.attacks.dp import dp_noise, privatize

__all__ = [
    "ATTACKS",
    "SURFACES",
    "Attack",
    "Inverter",
    "MembershipScorer",
    "AdapterExtractor",
    "Surface",
    "attacks_on",
    "register_attack",
    "dp_noise",
    "privatize",
]
