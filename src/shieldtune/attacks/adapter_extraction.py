"""LoRA extraction from what a Method 1 accelerator receives (surface ``accelerator``).

The attacker operates the accelerator. It holds the public model (every base weight, the
norms' γ and β), the adapter's settings (targets, rank r, alpha: the measured config names
them), the public seed and the weights' bit width, so it rebuilds the party's seeded adapter
(A₀, and B₀ = 0, i.e. ΔW₀ = 0) and the party's list of offloaded maps, in the party's own code
(:class:`~shieldtune.shielded.program.ShieldedParty` without offload). It sees every operand
sent for a frozen map. On the *plain offload* (the same engine without masks) that operand is
the fixed-point encoding of the clear input x: x up to a positive per-row scale (each row is
encoded by its own maximum, and the scale stays in the enclave).

**Why the relation is exact.** A LoRA map whose output is added to the residual stream (LLaMA
``o_proj`` / ``down_proj``, GPT-2 ``attn.c_proj`` / ``mlp.c_proj``, BERT
``attention.output.dense`` / ``output.dense``) computes, for every token n,

    h'_n = h_n + (W + ΔW) a_n + b,          ΔW = (alpha / r) · B A

with a_n the map's input (its own operand, seen as u_n = a_n / c_n), and h_n, h'_n the residual
stream before and after. Neither is sent, but a normalised copy of each is another map's
operand, read up to its own row scale:

- pre-norm (LLaMA, GPT-2): the operand x of the first map after a norm is γ ⊙ h / rms(h)
  (RMSNorm: h ∈ span{x/γ}) or γ ⊙ (h − μ)/σ + β (LayerNorm: h ∈ span{n, 1}, where
  n = (x − β)/γ is exact once x's scale is fixed by n having mean 0 and variance 1);
- post-norm (BERT): h' = LN(h + (W + ΔW) a + b) is the next map's operand, so the sum lies in
  span{n', 1}; h, the previous LayerNorm's output, is the operand of the block's first map,
  exact with its scale fixed the same way.

Dividing by c_n turns every unknown scale into a coefficient: per token n,

    (W + ΔW) u_n = Σ_k λ_nk f_nk                                                   (★)

with f_nk the known vectors above (plus b; BERT: h + b as one vector), k <= 4, λ_n unknown.
(★) holds token by token: attention, rotary embeddings, padding, the causal mask and every
other adapter never enter it. It is exact up to the operands' fixed-point rounding, in every
pass without dropout: evaluation passes (forwards with no backward after them) always,
training passes too for models without dropout (LLaMA). The one thing it cannot see is a
component of ΔW along the all-ones output direction when a LayerNorm reads the sum (the
vector 1 is in the span): LayerNorm removes it, so it changes nothing the model computes
either; estimates and truth are compared without it (:meth:`_Site.canonical`). With 2^-b
rounding, the relation's noise grows with ‖h‖ / ‖(W + ΔW) a‖, the residual stream's size
against the branch's.

**Solver** (:func:`solve_low_rank`). With λ eliminated (P_n: the projection off row n's
span), minimise Σ_n ‖P_n (W + s B A) u_n‖² + μ ‖A − A₀‖² by alternating exact least squares
for B and for A (preconditioned conjugate gradients). The prior (μ relative to the data's
largest curvature) keeps A at its public seed only in directions the inputs barely excite (a
random tiny model's nearly uniform attention makes ``o_proj``'s inputs span few directions);
elsewhere the data decide. B starts at its seed, 0, and stays 0 where no operand shows it.

**What it does not attack.** Maps whose LoRA output is mixed by attention before any operand
(q/k/v, PEFT's default targets for LLaMA and BERT, and GPT-2's ``c_attn``; v alone would be
exact given the attention pattern, which this attack does not rebuild); maps followed by an
activation (gate/up, ``intermediate.dense``, ``c_fc``); the last layer's residual map when the
next operand is the in-enclave head or BERT's [CLS]-only pooler. P-tuning v2's prefixes enter
the softmax over [prefix; tokens] keys, with no linear relation: ``prefix-extraction``
(:mod:`~shieldtune.attacks.prefix_extraction`) fits them instead. ``build`` refuses an adapter
with nothing to attack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shieldtune.adapters import ADAPTERS, parse_config
from shieldtune.attacks._rebuild import (
    accelerator_weight,
    layer_norm_scale,
    offloaded_maps,
    public_party,
)
from shieldtune.attacks.base import register_attack
from shieldtune.errors import ConfigError
from shieldtune.models.families import family_of

__all__ = ["LoraExtractor", "build_lora_extractor", "solve_low_rank"]

_F64 = torch.float64
# per family: (target map, map reading the residual before, the norm that map's operand comes
# out of, map reading it after, the norm that one's operand comes out of); {i}: the layer,
# {j} = i + 1, {p} = i - 1. LLaMA and GPT-2 are pre-norm: the residual is the norm's input.
# BERT is post-norm: the residual before *is* its norm's output, read as is.
_SITES: dict[str, tuple[tuple[str, str, str, str, str], ...]] = {
    "llama": (
        (
            "model.layers.{i}.self_attn.o_proj",
            "model.layers.{i}.self_attn.q_proj",
            "model.layers.{i}.input_layernorm",
            "model.layers.{i}.mlp.gate_proj",
            "model.layers.{i}.post_attention_layernorm",
        ),
        (
            "model.layers.{i}.mlp.down_proj",
            "model.layers.{i}.mlp.gate_proj",
            "model.layers.{i}.post_attention_layernorm",
            "model.layers.{j}.self_attn.q_proj",
            "model.layers.{j}.input_layernorm",
        ),
    ),
    "gpt2": (
        (
            "transformer.h.{i}.attn.c_proj",
            "transformer.h.{i}.attn.c_attn",
            "transformer.h.{i}.ln_1",
            "transformer.h.{i}.mlp.c_fc",
            "transformer.h.{i}.ln_2",
        ),
        (
            "transformer.h.{i}.mlp.c_proj",
            "transformer.h.{i}.mlp.c_fc",
            "transformer.h.{i}.ln_2",
            "transformer.h.{j}.attn.c_attn",
            "transformer.h.{j}.ln_1",
        ),
    ),
    "bert": (
        (
            "bert.encoder.layer.{i}.attention.output.dense",
            "bert.encoder.layer.{i}.attention.self.query",
            "bert.encoder.layer.{p}.output.LayerNorm",
            "bert.encoder.layer.{i}.intermediate.dense",
            "bert.encoder.layer.{i}.attention.output.LayerNorm",
        ),
        (
            "bert.encoder.layer.{i}.output.dense",
            "bert.encoder.layer.{i}.intermediate.dense",
            "bert.encoder.layer.{i}.attention.output.LayerNorm",
            "bert.encoder.layer.{j}.attention.self.query",
            "bert.encoder.layer.{i}.output.LayerNorm",
        ),
    ),
}
_POST_NORM = {"bert"}
# before the first layer ({p} = -1): the embeddings' norm
_FIRST = {"bert": "bert.embeddings.LayerNorm"}
# after the last layer: the map reading the final norm's output, if it is offloaded (an LM head)
_FINAL = {"llama": ("lm_head", "model.norm"), "gpt2": ("lm_head", "transformer.ln_f")}


@dataclass(frozen=True)
class _Reading:
    """The residual stream read off map ``map_id``'s operand u, the output of a norm (γ, β).

    ``post``: the residual is that output itself (post-norm), recovered exactly, c·u, with c
    from the LayerNorm's zero mean and unit variance. Otherwise it is the norm's input, known
    up to per-row coefficients: span{u/γ} after an RMSNorm, span{n, 1} after a LayerNorm
    (n = c·u/γ − β/γ, exact).
    """

    map_id: int
    gamma: Tensor  # (d,)
    beta: Tensor | None  # (d,), None for an RMSNorm
    post: bool = False

    def basis(self, u: Tensor) -> list[Tensor]:
        """Vectors spanning the residual, up to per-row coefficients: (n, d) or (d,) each."""
        if self.beta is None:
            return [u / self.gamma]
        v, w = u / self.gamma, self.beta / self.gamma
        n = layer_norm_scale(v, w) * v - w  # (n, d): mean 0, variance 1 per row
        return [n * self.gamma + self.beta] if self.post else [n, torch.ones_like(w)]


@dataclass(frozen=True)
class _Site:
    """An adapted map whose relation (★) the attacker can write."""

    name: str
    map_id: int
    weight: Tensor  # (out, in) float64: what the accelerator multiplies by, dequantised
    bias: Tensor | None  # (out,)
    before: _Reading
    after: _Reading
    a0: Tensor  # (r, in) float64: the public seeded LoRA A

    def canonical(self, delta: Tensor) -> Tensor:
        """ΔW without its component along the all-ones output direction when the output feeds a
        LayerNorm: LayerNorm subtracts it, so it changes nothing the model computes and no
        operand shows it (the same adapter, as a function)."""
        if self.after.beta is None:
            return delta
        return delta - delta.mean(dim=0, keepdim=True)

    def basis(self, before: Tensor, after: Tensor) -> list[Tensor]:
        """The vectors f_k of (★) for one pass: (n, out) or (out,) each, none repeated."""
        vectors = self.after.basis(after)
        if self.before.post:  # h + b: one exact vector (BERT), its coefficient shared
            (h,) = self.before.basis(before)
            return [*vectors, h if self.bias is None else h + self.bias]
        extra = [v for v in self.before.basis(before) if v.dim() == 2 or self.after.beta is None]
        return [*vectors, *extra, *([] if self.bias is None else [self.bias])]


def _pcg(
    apply: Callable[[Tensor], Tensor],
    rhs: Tensor,
    x: Tensor,
    precondition: Callable[[Tensor], Tensor],
    iters: int,
    tol: float,
) -> Tensor:
    """Preconditioned conjugate gradients for ``apply(x) = rhs`` (apply symmetric positive)."""
    r = rhs - apply(x)
    z = precondition(r)
    d, rz = z, float((r * z).sum())
    stop = tol * float(rhs.norm())
    for _ in range(iters):
        if float(r.norm()) <= stop:
            break
        ad = apply(d)
        step = rz / float((d * ad).sum())
        x, r = x + step * d, r - step * ad
        z = precondition(r)
        rz, old = float((r * z).sum()), rz
        d = z + (rz / old) * d
    return x


def _b_step(project: Callable[[Tensor], Tensor], pt: Tensor, z: Tensor, b: Tensor) -> Tensor:
    """B minimising Σ_n ‖P_n (W u_n + B z_n)‖² (z = s A u: (N, r)), from ``b`` (out, r)."""
    eye = torch.eye(z.shape[1], dtype=_F64)
    zz = torch.linalg.inv(z.T @ z + torch.finfo(_F64).tiny * eye)  # (r, r)
    return _pcg(lambda x: project(z @ x.T).T @ z, -pt.T @ z, b, lambda x: x @ zz, 25, 1e-9)


def _a_step(
    project: Callable[[Tensor], Tensor],
    pt: Tensor,
    u: Tensor,
    m: Tensor,
    g: tuple[Tensor, Tensor],
    a: Tensor,
    a0: Tensor,
    rho: float,
) -> Tensor:
    """A minimising Σ_n ‖P_n (W u_n + m A u_n)‖² + μ‖A − A₀‖² (m = s B: (out, r)), from ``a``.

    Preconditioned by the same problem without P: mᵀm A G + μ A = R, G = Σ u uᵀ, solved in
    the eigenbases ``g`` of G and of mᵀm.
    """
    g_vals, g_vecs = g[0].clamp_min(0), g[1]
    h_vals, h_vecs = torch.linalg.eigh(m.T @ m)  # (r,), (r, r)
    h_vals = h_vals.clamp_min(0)
    mu = max(rho * float(g_vals.max()) * float(h_vals.max()), torch.finfo(_F64).tiny)
    scale = h_vals[:, None] * g_vals[None, :] + mu  # (r, in)

    def sylvester(x: Tensor) -> Tensor:
        return h_vecs @ ((h_vecs.T @ x @ g_vecs) / scale) @ g_vecs.T

    def apply(x: Tensor) -> Tensor:
        return m.T @ project(u @ x.T @ m.T).T @ u + mu * x

    return _pcg(apply, -m.T @ pt.T @ u + mu * a0, a, sylvester, 25, 1e-9)


def solve_low_rank(
    u: Tensor,
    basis: Tensor,
    weight: Tensor,
    a0: Tensor,
    scaling: float,
    *,
    rho: float = 1e-8,
    max_iters: int = 20,
    tol: float = 1e-6,
) -> Tensor:
    """ΔW = s·B·A (rank r) that best satisfies (★) for every row, with A kept near A₀.

    With λ eliminated (P_n projects onto the complement of row n's basis), it minimises
    Σ_n ‖P_n (W u_n + s B A u_n)‖² + μ ‖A − A₀‖², alternating B and A, each an exact
    least-squares problem solved by conjugate gradients, preconditioned by the same problem
    without the projections (B: a right (ZᵀZ)⁻¹; A: a Sylvester solve in the eigenbases of
    Σ u uᵀ and s² BᵀB).

    Args:
        u: (N, in) the map's operands as seen (any positive per-row scale).
        basis: (N, out, k) per-row vectors whose span holds (W + ΔW) u_n.
        weight: (out, in) the frozen weight.
        a0: (r, in) the public initial A.
        scaling: s = alpha / r.
        rho: Prior strength μ relative to the largest curvature of the A problem.
        max_iters: Most alternations.
        tol: Stop when ΔW changes by less than this, relatively.

    Returns:
        (out, in) float64 ΔW.
    """
    tiny = torch.finfo(_F64).tiny
    u = u.to(_F64)
    u = u / u.abs().amax(dim=1, keepdim=True).clamp_min(tiny)  # (N, in), rows of max 1
    q = torch.linalg.qr(basis.to(_F64)).Q  # (N, out, k) orthonormal per row

    def project(y: Tensor) -> Tensor:  # (N, out) -> P_n y_n
        return y - torch.einsum("nok,nk->no", q, torch.einsum("nok,no->nk", q, y))

    pt = project(u @ weight.T)  # (N, out): P W u
    g = torch.linalg.eigh(u.T @ u)  # of (in, in)
    a, b = a0.to(_F64).clone(), torch.zeros(weight.shape[0], a0.shape[0], dtype=_F64)
    delta = torch.zeros_like(weight)
    for _ in range(max_iters):
        b = _b_step(project, pt, scaling * u @ a.T, b)
        a = _a_step(project, pt, u, scaling * b, g, a, a0, rho)
        new = scaling * b @ a
        change = float((new - delta).norm()) / max(float(new.norm()), tiny)
        delta = new
        if change < tol:
            break
    return delta


class LoraExtractor:
    """Recovers the LoRA deltas of every attackable adapted map from forward passes.

    Args:
        sites: The maps it attacks.
        scaling: alpha / r.
        adapted: Every adapted map's name (attacked or not).
        rho: Prior strength (see :func:`solve_low_rank`).
    """

    def __init__(
        self, sites: Sequence[_Site], scaling: float, adapted: Sequence[str], rho: float = 1e-8
    ) -> None:
        self.sites, self.scaling, self.rho = list(sites), scaling, rho
        self.adapted = list(adapted)
        self.rank = int(self.sites[0].a0.shape[0]) if self.sites else 0

    @property
    def names(self) -> list[str]:
        """The maps it attacks, in model order."""
        return [s.name for s in self.sites]

    @property
    def skipped(self) -> list[str]:
        """Adapted maps it cannot attack (see the module docstring)."""
        return [n for n in self.adapted if n not in self.names]

    def deltas(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The true ΔW = s·B·A of the attacked maps in an adapter state (for scoring), in the
        same canonical form as the estimates (:meth:`_Site.canonical`)."""
        return {
            site.name: site.canonical(
                self.scaling
                * state[f"{site.name}.lora_B.default.weight"].to(_F64)
                @ state[f"{site.name}.lora_A.default.weight"].to(_F64)
            )
            for site in self.sites
        }

    def rows(self, passes: Sequence[Mapping[int, Tensor]], site: _Site) -> tuple[Tensor, Tensor]:
        """``(u (N, in), basis (N, out, k))`` of one site over all passes."""
        us, bases = [], []
        for operands in passes:
            u = operands[site.map_id].to(_F64)  # (n, in)
            before = operands[site.before.map_id].to(_F64)
            after = operands[site.after.map_id].to(_F64)
            n, out = u.shape[0], site.weight.shape[0]
            if before.shape[0] != n or after.shape[0] != n:
                raise ValueError(f"{site.name}: operands of one pass have different row counts")
            vectors = site.basis(before, after)
            kept = [v.expand(n, out) for v in vectors if bool(v.abs().amax() > 0)]
            us.append(u)
            bases.append(torch.stack(kept, dim=-1))  # (n, out, k)
        return torch.cat(us), torch.cat(bases)

    def __call__(
        self, passes: Sequence[Mapping[int, Tensor]], masks: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``{map name: (out, in) recovered ΔW}`` from forward passes under one adapter state
        (token-wise: the batches' ``masks`` are not needed).

        Raises:
            KeyError: A pass lacks the operand of a map the attack reads.
        """
        out = {}
        for site in self.sites:
            u, basis = self.rows(passes, site)
            delta = solve_low_rank(u, basis, site.weight, site.a0, self.scaling, rho=self.rho)
            out[site.name] = site.canonical(delta)
        return out


def _reading(map_id: int, norm: nn.Module, post: bool = False) -> _Reading:
    beta = getattr(norm, "bias", None)
    gamma = norm.weight.detach().to(_F64)
    return _Reading(map_id, gamma, None if beta is None else beta.detach().to(_F64), post)


def build_lora_extractor(
    model: str,
    adapter: Mapping[str, Any],
    *,
    task: str = "seq-cls",
    num_labels: int | None = 2,
    seed: int = 0,
    w_bits: int | None = 12,
    rho: float = 1e-8,
) -> LoraExtractor:
    """The attacker's rebuild of the party's adapted model, and the relations it can use.

    Args:
        model: The public model (preset or folder).
        adapter: The adapter's settings, ``method`` included.
        task: The party's task.
        num_labels: Its classes (seq-cls).
        seed: The party's public seed (its adapter's initialisation).
        w_bits: Bits of the integer weights the accelerator multiplies by (None: float W).
        rho: Prior strength (see :func:`solve_low_rank`).

    Returns:
        The extractor.

    Raises:
        ConfigError: Not LoRA, or no adapted map has an exact relation.
    """
    options = dict(adapter)
    method = options.pop("method", None)
    if method != "lora":
        raise ConfigError(
            f"adapter extraction: method {method!r} is not attacked (LoRA only; P-tuning v2 "
            "prefixes: attack 'prefix-extraction')"
        )
    party = public_party(
        model,
        {"method": "lora", **options},
        task=task,
        num_labels=num_labels,
        seed=seed,
        w_bits=w_bits,
    )
    settings = parse_config(ADAPTERS.get("lora").config_cls, options, "adapter")
    root = party.adapter.model
    maps = offloaded_maps(party, root)
    init = party.adapter.state_dict()
    adapted = [k.removesuffix(".lora_A.default.weight") for k in init if ".lora_A." in k]
    family = family_of(root).name
    last = len(family_of(root).layers(root)) - 1
    sites = []
    for layer in range(last + 1):
        for target, b_map, b_norm, a_map, a_norm in _SITES.get(family, ()):
            names = {"i": layer, "j": layer + 1, "p": layer - 1}
            name, nxt = target.format(**names), a_map.format(**names)
            if layer == last and "{j}" in a_map and family in _FINAL:
                nxt, a_norm = _FINAL[family]  # the last residual map feeds the final norm
            if layer == 0 and "{p}" in b_norm:
                b_norm = _FIRST[family]
            if name not in adapted or nxt not in maps:
                continue
            weight, bias = accelerator_weight(maps[name][1], w_bits)
            sites.append(
                _Site(
                    name,
                    maps[name][0],
                    weight,
                    bias,
                    _reading(
                        maps[b_map.format(**names)][0],
                        root.get_submodule(b_norm.format(**names)),
                        post=family in _POST_NORM,
                    ),
                    _reading(maps[nxt][0], root.get_submodule(a_norm.format(**names))),
                    init[f"{name}.lora_A.default.weight"].to(_F64),
                )
            )
    if not sites:
        raise ConfigError(
            f"adapter extraction: no adapted map of this {family} model has an exact relation "
            f"(adapted: {adapted[:4]}...); attackable targets: "
            f"{[t[0].split('{i}.')[1] for t in _SITES.get(family, ())] or 'none'}"
        )
    return LoraExtractor(sites, settings.alpha / settings.rank, adapted, rho)


register_attack(
    name="lora-extraction",
    surface="accelerator",
    summary="LoRA ΔW of residual-stream maps by least squares on the operands of consecutive maps",
    build=build_lora_extractor,
)
