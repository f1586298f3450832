"""The differential-privacy option of a client update: clip its L2 norm, add Gaussian noise.

DP-FedAvg's client step (McMahan et al., ICLR 2018) on one update delta:

    Δ' = Δ · min(1, C / ‖Δ‖₂) + N(0, (σ·C)² I)

over all floating tensors together (‖Δ‖₂ is the norm of their concatenation); integer tensors
(SPF indices) pass through. σ is the noise multiplier. Here it is the defence the update-leakage
attacks are measured against; no privacy accounting (ε, δ) is done. It lives with the attacks
until the federated package grows its own DP option, which should then reuse this function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from shieldtune.errors import ConfigError

__all__ = ["dp_noise", "privatize"]


def dp_noise(
    update: Mapping[str, torch.Tensor], clip: float, sigma: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Clip an update delta to L2 norm ``clip`` and add N(0, (sigma·clip)²) to every entry.

    Args:
        update: The delta (name -> tensor); integer tensors pass through unchanged.
        clip: C > 0, the largest L2 norm of the floating tensors together.
        sigma: σ >= 0, the noise multiplier (0 clips only).
        generator: Source of the noise (CPU).

    Returns:
        New tensors, same names, shapes and dtypes.

    Raises:
        ConfigError: ``clip`` <= 0 or ``sigma`` < 0 (or not finite).
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"dp clip must be a finite number > 0, got {clip!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"dp sigma must be a finite number >= 0, got {sigma!r}")
    floats = [t for t in update.values() if t.is_floating_point()]
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in floats))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out: dict[str, torch.Tensor] = {}
    for name, t in update.items():
        if not t.is_floating_point():
            out[name] = t.clone()
            continue
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64) * (sigma * clip)
        out[name] = (t.double() * scale + noise).to(t.dtype)
    return out


def privatize(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    clip: float,
    sigma: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """An uploaded adapter state with DP: ``reference + dp_noise(update − reference)``.

    Args:
        update: The client's new adapter state (what plain FedAvg uploads).
        reference: The global state it started from (same names and shapes).
        clip: C, see :func:`dp_noise`.
        sigma: σ, see :func:`dp_noise`.
        generator: Source of the noise.

    Returns:
        The state to upload in its place; integer tensors are the update's.
    """
    delta = {n: t - reference[n] if t.is_floating_point() else t for n, t in update.items()}
    noisy = dp_noise(delta, clip, sigma, generator)
    return {n: reference[n] + d if d.is_floating_point() else d for n, d in noisy.items()}
