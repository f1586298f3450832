"""The accelerator's operator rebuilds a Method 1 party from what is public.

Shared by the adapter-extraction attacks (surface ``accelerator``): the party's own code run
without offload (:class:`~shieldtune.shielded.program.ShieldedParty`) gives the model, the
seeded initial adapter and the ordered list of offloaded maps; ``w_bits`` (in the worker's setup
message) gives the integer weights the accelerator multiplies by.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from shieldtune.shielded.field import quantize_weight
from shieldtune.shielded.linear import FrozenLinear, frozen_linears
from shieldtune.shielded.program import ShieldedParty

__all__ = ["public_party", "offloaded_maps", "accelerator_weight", "layer_norm_scale"]

_F64 = torch.float64


def public_party(
    model: str,
    adapter: Mapping[str, Any],
    *,
    task: str,
    num_labels: int | None,
    seed: int,
    w_bits: int | None,
) -> ShieldedParty:
    """The party as its public settings build it: the seeded adapter, nothing offloaded.

    Args:
        model: The public model (preset or folder).
        adapter: The adapter's settings, ``method`` included.
        task: The party's task.
        num_labels: Its classes (seq-cls).
        seed: The party's public seed (its adapter's initialisation).
        w_bits: Bits of the integer weights (None: float weights).
    """
    return ShieldedParty(
        model=model,
        task=task,
        num_labels=num_labels,
        adapter=dict(adapter),
        lr=1e-3,
        train=None,
        seed=seed,
        total_steps=1,
        offload=False,
        w_bits=w_bits or 0,
        field_bits=0,
        max_bits=0,
        check_rate=1.0,
        pool_size=0,
        rows=1,
    )


def offloaded_maps(
    party: ShieldedParty, root: nn.Module | None = None
) -> dict[str, tuple[int, FrozenLinear]]:
    """``name -> (map id, map)`` of every map the party offloads, ids in the worker's order;
    names are paths in ``root`` (default: in the party's model slice, ``layers.0...``)."""
    return {f.name: (i, f) for i, f in enumerate(frozen_linears(party.whole, root))}


def accelerator_weight(frozen: FrozenLinear, w_bits: int | None) -> tuple[Tensor, Tensor | None]:
    """``(weight (out, in), bias (out,) or None)`` in float64, the weight as the accelerator
    multiplies by it (the per-channel integers times their scales; float W with no ``w_bits``)."""
    weight = frozen.weight.detach()
    if w_bits:
        qw = quantize_weight(weight, w_bits)
        weight = qw.w_int.to(_F64) * qw.scale.to(_F64)[:, None]
    bias = None if frozen.bias is None else frozen.bias.detach().to(_F64)
    return weight.to(_F64), bias


def layer_norm_scale(v: Tensor, w: Tensor) -> Tensor:
    """Per row, the c > 0 for which n = c·v − w has mean 0 and variance 1 (a LayerNorm output
    γ ⊙ n + β seen as u = (γ ⊙ n + β)/c gives v = u/γ, w = β/γ): a root of the variance
    condition, the one that best meets the mean condition. (n, d), (d,) -> (n, 1)."""
    vc, wc = v - v.mean(1, keepdim=True), w - w.mean()
    a = vc.pow(2).mean(1, keepdim=True)  # c² var(v) − 2c cov(v, w) + var(w) − 1 = 0
    b = (vc * wc).mean(1, keepdim=True)
    root = (b.pow(2) - a * (wc.pow(2).mean() - 1)).clamp_min(0).sqrt()
    roots = torch.cat([(b + root) / a, (b - root) / a], dim=1)  # (n, 2)
    miss = (roots * v.mean(1, keepdim=True) - w.mean()).abs() + 1e9 * (roots <= 0)
    return roots.gather(1, miss.argmin(1, keepdim=True))
