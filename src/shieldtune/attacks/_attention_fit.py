"""One layer's prefix relation (★) and its fit, for :mod:`~shieldtune.attacks.prefix_extraction`.

A query row n of head h attends over the P prefix slots and the tokens its mask lets it see:

    o_n^h = softmax_j([q_n^h·K_j ; q_n^h·k_m]/√d) [V_j ; v_m]                               (★)

:class:`Attention` holds everything in (★) but the prefix (queries, and the token part
reduced to a log-denominator and a weighted value), so o is cheap to evaluate for any (K, V);
:func:`fit_prefix` finds the (K, V) whose outputs point along observed directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from shieldtune.models.masks import additive_mask

__all__ = ["Attention", "token_rows", "join_rows", "fit_prefix", "RHOS"]

_F64 = torch.float64
RHOS = (1e-2, 1e-2, 1e-3, 1e-4)  # per round of fit_prefix, its prior's relative strength


@dataclass(frozen=True)
class Attention:
    """One layer's attention rows, everything but the prefix: what (★) needs.

    Attributes:
        q: (N, H, d) queries (rotated where the family rotates).
        logz: (N, H) log of the softmax denominator over the visible tokens.
        tokens: (N, H, d) the softmax-weighted values over the visible tokens alone.
        scaling: 1/√d.
    """

    q: Tensor
    logz: Tensor
    tokens: Tensor
    scaling: float

    def output(self, keys: Tensor, values: Tensor) -> Tensor:
        """(N, H, d) attention output with the prefix ``keys``, ``values`` (H_kv, P, d)."""
        rep = self.q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(rep, 0), values.repeat_interleave(rep, 0)  # (H,P,d)
        logits = torch.einsum("nhd,hpd->nhp", self.q, keys) * self.scaling  # (N, H, P)
        weights = torch.cat([self.logz[..., None], logits], dim=-1).softmax(-1)  # (N, H, 1+P)
        prefix = torch.einsum("nhp,hpd->nhd", weights[..., 1:], values)  # (N, H, d)
        return weights[..., :1] * self.tokens + prefix  # (N, H, d)


def token_rows(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: bool) -> Attention:
    """The rows of (★) for one batch, the prefix left out.

    Args:
        q: (B, H, T, d) queries.
        k: (B, H_kv, T, d) keys (H a multiple of H_kv: grouped-query heads share them).
        v: (B, H_kv, T, d) values.
        mask: (B, T) padding mask (1: a token).
        causal: Whether a token sees only the tokens before it (and itself).

    Returns:
        Its B·T rows, batch-major.
    """
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, T, d)
    scores = q @ k.transpose(-1, -2) * d**-0.5  # (B, H, T, T)
    scores = scores + additive_mask(mask, causal=causal, prefix_len=0, dtype=_F64)
    logz = scores.logsumexp(-1)  # (B, H, T)
    tokens = scores.softmax(-1) @ v  # (B, H, T, d)
    return Attention(
        q.transpose(1, 2).reshape(b * t, h, d),
        logz.transpose(1, 2).reshape(b * t, h),
        tokens.transpose(1, 2).reshape(b * t, h, d),
        d**-0.5,
    )


def join_rows(parts: Sequence[Attention]) -> Attention:
    """The rows of several batches, in order, as one :class:`Attention`."""
    return Attention(
        torch.cat([a.q for a in parts]),
        torch.cat([a.logz for a in parts]),
        torch.cat([a.tokens for a in parts]),
        parts[0].scaling,
    )


def _sin2(o: Tensor, seen: Tensor) -> Tensor:
    """Σ_n sin² of the angle between o_n (N, H, d) and the unit rows seen_n (N, H·d)."""
    o = o.reshape(seen.shape)  # (N, H·d)
    along = (o * seen).sum(1)  # (N,)
    return (1 - along.pow(2) / o.pow(2).sum(1).clamp_min(torch.finfo(_F64).tiny)).sum()


def _block_scales(attn: Attention, seen: Tensor, init: Tensor, probes: int = 8) -> Tensor:
    """Per block (keys, values), 1/√(mean Gauss–Newton curvature) of Σ sin² at ``init``:
    ‖J_blockᵀ z‖² over Gaussian z estimates ‖J_block‖²_F (Hutchinson). -> (2, 1, 1, 1)."""
    prefix = init.clone().requires_grad_(True)  # (2, H_kv, P, d)
    o = attn.output(prefix[0], prefix[1]).reshape(seen.shape)  # (N, H·d)
    norm = o.norm(dim=1, keepdim=True)
    residual = (o - (o * seen).sum(1, keepdim=True) * seen) / norm  # (N, H·d): sin per row
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros_like(init)
    for _ in range(probes):
        z = torch.randn(residual.shape, generator=gen, dtype=_F64)
        (grad,) = torch.autograd.grad(residual, prefix, z, retain_graph=True)
        total += grad.pow(2) / probes
    curvature = total.flatten(1).mean(1).clamp_min(torch.finfo(_F64).tiny)  # (2,)
    return curvature.rsqrt()[:, None, None, None]


def _unit_rows(x: Tensor) -> Tensor:
    """Each row of x (N, m) scaled to norm 1 (float64)."""
    x = x.to(_F64)
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(_F64).tiny)  # (N, m)


def _fit_round(
    attn: Attention, seen: Tensor, init: Tensor, start: Tensor, free: Tensor, rho: float, iters: int
) -> Tensor:
    """One round of :func:`fit_prefix`: L-BFGS (strong Wolfe) from ``start`` over the blocks
    ``free`` (2, 1, 1, 1) lets move, in coordinates scaled at ``start``. -> (2, H_kv, P, d)."""
    scale = _block_scales(attn, seen, start)  # (2, 1, 1, 1)
    z = torch.zeros_like(start, requires_grad=True)  # (2, H_kv, P, d)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=iters,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        moved = start + free * scale * z  # (2, H_kv, P, d)
        prior = ((moved - init) / scale).pow(2).sum()
        loss = _sin2(attn.output(moved[0], moved[1]), seen) + rho * prior
        loss.backward()
        return loss

    opt.step(closure)
    return (start + free * scale * z).detach()  # (2, H_kv, P, d)


def fit_prefix(
    attn: Attention,
    seen: Tensor,
    init: Tensor,
    *,
    rhos: Sequence[float] = RHOS,
    iters: int = 300,
) -> Tensor:
    """The prefix of one layer that best explains the observed attention-output directions.

    Minimises Σ_n sin²∠(o_n, seen_n) + ρ‖(prefix − init)/s‖² over prefix = start + s ⊙ z, one
    round of L-BFGS (strong Wolfe) per ρ in ``rhos``, each from z = 0 where the last stopped,
    with s from :func:`_block_scales` at that point. The first round moves the values alone:
    at the public start the values are near 0, so the keys barely act on o (∂o/∂K_j ∝ V_j − o)
    and a joint step in the start's coordinates would run them off into a saturated softmax.
    The prior is then relaxed round by round: the early rounds settle in the basin of the
    public start under a firm pull towards it, the last ones refine the fit with little bias.

    Args:
        attn: The layer's rows (queries and token part).
        seen: (N, H·d) the observed o_proj operands (any positive row scale).
        init: (2, H_kv, P, d) the public initial keys and values.
        rhos: Per round, the prior's strength (towards ``init``) relative to the data's mean
            curvature per coordinate; at least 2 rounds (the first: values alone).
        iters: Most L-BFGS iterations, all rounds together.

    Returns:
        (2, H_kv, P, d) float64 keys and values.

    Raises:
        ValueError: Fewer than 2 rounds.
    """
    if len(rhos) < 2:
        raise ValueError(f"fit_prefix: rhos={list(rhos)}; at least 2 rounds (the first: values)")
    seen = _unit_rows(seen)  # (N, H·d)
    init = init.to(_F64).contiguous()  # (2, H_kv, P, d)
    values = torch.tensor([0.0, 1.0], dtype=_F64)[:, None, None, None]  # (2, 1, 1, 1)
    per_round = max(iters // len(rhos), 1)
    prefix = _fit_round(attn, seen, init, init, values, rhos[0], per_round)  # the values alone
    for rho in rhos[1:]:
        prefix = _fit_round(attn, seen, init, prefix, torch.ones_like(values), rho, per_round)
    return prefix  # (2, H_kv, P, d)
