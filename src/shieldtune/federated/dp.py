"""The differential-privacy option of federated updates: clip each L2 norm, add Gaussian noise.

DP-FedAvg (McMahan et al., ICLR 2018) on update deltas Δ_j:

    client update:  Δ_j' = Δ_j · min(1, C / ‖Δ_j‖₂)                 (clip)
    aggregate:      Δ = Σ_j w_j Δ_j' / Σ_j w_j + N(0, (σ · C · s)² I)  s = max_j w_j / Σ_j w_j

over all floating tensors together (‖Δ‖₂ is the norm of their concatenation); integer tensors
(SPF indices) pass through. σ is the noise multiplier; s bounds one client's share of the
average (``1/n`` for equal weights, giving the usual σ·C/n). No privacy accounting (ε, δ) is
done here. :func:`dp_noise` is the single-update form the attacks measure against
(:mod:`shieldtune.attacks` re-exports it).

Noise comes from a caller's ``torch.Generator`` (reproducible, for experiments) or, when none
is given, from the operating system's CSPRNG (:func:`csprng_normal`): what the aggregation does,
inside the server enclave in ``split``, so that nobody can predict or replay it. This module
imports only torch and :mod:`shieldtune.errors` (it is part of the ``fedavg`` enclave's
measurement).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from shieldtune.errors import ConfigError

__all__ = ["check_dp", "csprng_normal", "gaussian", "clip_l2", "dp_noise", "privatize"]


def check_dp(
    clip: float | None, sigma: float, names: tuple[str, str] = ("dp clip", "dp sigma")
) -> None:
    """Refuse DP settings that mean nothing.

    Args:
        clip: C, the L2 bound (None: no DP).
        sigma: σ >= 0, the noise multiplier.
        names: How the messages name the two settings (e.g. ``split.dp_clip``).

    Raises:
        ConfigError: ``clip`` <= 0 or not finite, ``sigma`` < 0 or not finite, or σ > 0 without
            a clip (noise needs a sensitivity bound).
    """
    c, s = names
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"{c} must be a finite number > 0, got {clip!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"{s} must be a finite number >= 0, got {sigma!r}")
    if clip is None and sigma > 0:
        raise ConfigError(
            f"{s} is {sigma} but {c} is not set: noise needs a clipping bound; "
            f"set {c} (e.g. 1.0) or {s} to 0"
        )


def csprng_normal(n: int) -> torch.Tensor:
    """``(n,)`` float64 draws of N(0, 1) from ``os.urandom`` (Box-Muller on 53-bit uniforms)."""
    raw = torch.frombuffer(bytearray(os.urandom(16 * n)), dtype=torch.int64)  # (2n,)
    u = ((raw >> 11) & ((1 << 53) - 1)).double().add_(1.0).mul_(2.0**-53)  # (2n,) in (0, 1]
    radius = torch.sqrt(-2.0 * torch.log(u[:n]))  # (n,)
    return radius * torch.cos(2.0 * math.pi * u[n:])  # (n,)


def gaussian(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """float64 N(0, 1) of ``shape`` from ``generator``, or from the OS CSPRNG when None."""
    if generator is None:
        return csprng_normal(math.prod(shape)).reshape(shape)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def clip_l2(update: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale the floating tensors of ``update`` together to L2 norm at most ``clip`` (float64).

    Integer tensors pass through (cloned).
    """
    floats = [t for t in update.values() if t.is_floating_point()]
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in floats))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {
        name: t.double() * scale if t.is_floating_point() else t.clone()
        for name, t in update.items()
    }


def dp_noise(
    update: Mapping[str, torch.Tensor],
    clip: float,
    sigma: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Clip an update delta to L2 norm ``clip`` and add N(0, (sigma·clip)²) to every entry.

    Args:
        update: The delta (name -> tensor); integer tensors pass through unchanged.
        clip: C > 0, the largest L2 norm of the floating tensors together.
        sigma: σ >= 0, the noise multiplier (0 clips only).
        generator: Source of the noise (CPU); None: the OS CSPRNG.

    Returns:
        New tensors, same names, shapes and dtypes.

    Raises:
        ConfigError: ``clip`` <= 0 or ``sigma`` < 0 (or not finite).
    """
    check_dp(clip, sigma)
    clipped = clip_l2(update, clip)
    out: dict[str, torch.Tensor] = {}
    for name, t in update.items():
        if not t.is_floating_point():
            out[name] = clipped[name]
            continue
        noise = gaussian(tuple(t.shape), generator) * (sigma * clip)
        out[name] = (clipped[name] + noise).to(t.dtype)
    return out


def privatize(
    update: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    clip: float,
    sigma: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """An uploaded adapter state with DP: ``reference + dp_noise(update − reference)``.

    Args:
        update: The client's new adapter state (what plain FedAvg uploads).
        reference: The global state it started from (same names and shapes).
        clip: C, see :func:`dp_noise`.
        sigma: σ, see :func:`dp_noise`.
        generator: Source of the noise (None: the OS CSPRNG).

    Returns:
        The state to upload in its place; integer tensors are the update's.
    """
    delta = {n: t - reference[n] if t.is_floating_point() else t for n, t in update.items()}
    noisy = dp_noise(delta, clip, sigma, generator)
    return {n: reference[n] + d if d.is_floating_point() else d for n, d in noisy.items()}
