"""P-tuning v2 prefix extraction from the operands a Method 1 accelerator receives.

The attacker operates the accelerator. It holds the public model (every base weight, the
norms' γ and β, the rotary embedding), the adapter's settings (P virtual tokens on every
layer), the public seed (so the seeded initial prefix K₀, V₀) and the weights' bit width, and
rebuilds the party in the party's own code (:func:`~shieldtune.attacks._rebuild.public_party`).
It sees every operand of every offloaded map, in order. On the *plain offload* (the same
engine without masks) an operand is the clear fixed-point input up to a positive per-row
scale. Each forward's batch layout (B, T and the padding mask) is given to it: only the plain
view could reveal it, and on the shielded view it only makes the attacker stronger.

**The relation, one layer at a time.** Per layer, the prefix is P keys K_j and P values V_j per
key/value head (grouped-query heads share them). A query token n of head h attends over the
prefix (always visible) and the tokens its mask lets it see:

    o_n^h = softmax_j([q_n^h·K_j ; q_n^h·k_m]/√d) [V_j ; v_m]                              (★)

- q, k, v: the operand of q/k/v_proj (GPT-2: ``c_attn``; BERT: query/key/value) is a norm's
  output, so its scale is not unknown after all: an RMSNorm's output x has rms(x/γ) = 1, a
  LayerNorm's n = (x − β)/γ has mean 0 and variance 1 (:func:`~._rebuild.layer_norm_scale`).
  The attacker rebuilds x, multiplies by the integer weights the accelerator holds (the same
  product the party decoded), adds the public biases and, for LLaMA, applies the rotary
  embedding at positions P + t (PEFT's offset; prefix keys are stored unrotated).
- o: the operand of o_proj (``c_proj``, ``attention.output.dense``) is o_n, all heads, up to
  one unknown positive scale per row: its *direction* is observed exactly.

Every layer reads its own inputs and output, so the layers decouple, and nothing else (other
layers' prefixes, the MLPs, the head) enters (★). Given the keys, (★) is linear in the values;
the token part (the logsumexp and the softmax-weighted values over the visible tokens) is fixed
by the observed operands and computed once.

**What the views determine.** Per layer there are 2·P·H_kv·d unknowns and N·(H·d − 1)
equations (N token rows: each row's direction, scale eliminated). With exact operands the truth
fits (★) to float64 rounding. Fixed-point rounding of the operands, and RMSNorm's ε (rms(x/γ)
is √(ms/(ms + ε)), taken as 1), perturb (★) slightly (a misfit sin∠ of ~10⁻⁴ per row on the
tiny models). What no view can show: a component of K_j orthogonal to every query of its group
(no logit sees it), and the order of the P slots (a permutation of (K_j, V_j) pairs computes
the same function; the fit starts at the public initialisation, so it stays in the right
order). And what the views barely show: while the prefix logits q·K_j/√d are small (the public
initialisation, and a prefix trained little on a model whose queries are short, as in the
tiny random models), (★) is close to its first-order expansion, which only sees Σ_j V_j and
Σ_j K_j V_jᵀ per head group, so K and V apart are set by second-order terms that the operand
noise can swamp. The prefix's *effect* is determined either way, which is why the attack's
primary metric is that effect (below); K and V themselves come back as well once training has
grown the logits (the tests' trained victim: ΔK within 4 %, ΔV within 1 %).

**Solver** (:func:`~shieldtune.attacks._attention_fit.fit_prefix`): minimise
Σ_n sin²∠(o_n(K, V), seen_n) plus a prior towards the public prefix, by L-BFGS with a
strong-Wolfe line search, in coordinates where the Gauss–Newton curvature of each block (keys,
values) averages 1, in four rounds. The first moves the values alone: at the public start they
are near 0, so the keys barely act on o and their curvature there is orders of magnitude below
the values'. Each later round moves both from where the last stopped, in coordinates re-scaled
there, and relaxes the prior (ρ = 10⁻², 10⁻², 10⁻³, 10⁻⁴ of that curvature): the firm early
pull keeps the fit in the public start's basin and off directions the views barely constrain
(with a weak prior throughout, MiniLM's values ran off to 6× their change), the weak late one
lets well-determined directions settle with little bias.

**Metrics** (:meth:`PrefixExtractor.scores`): ``attention_error``, the prefix's *effect* on
tokens the attack never saw: ‖o(K̂, V̂) − o(K, V)‖ / ‖o(K₀, V₀) − o(K, V)‖ over every layer's
attention output at the real tokens of held-out batches (each layer's clear q, k, v from the
victim's model), so the public start scores 1 and only what training changed counts, and a
random guess of the change's norm about 1 or more; and the relative error of
ΔK = K − K₀ and ΔV = V − V₀ (together, and each), where the public start scores 1 and a random
guess of the right norm √2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shieldtune.attacks._attention_fit import RHOS, Attention, fit_prefix, join_rows, token_rows
from shieldtune.attacks._rebuild import (
    accelerator_weight,
    layer_norm_scale,
    offloaded_maps,
    public_party,
)
from shieldtune.attacks.base import register_attack
from shieldtune.attacks.metrics import relative_error
from shieldtune.errors import ConfigError
from shieldtune.shielded.program import ShieldedParty

__all__ = ["PrefixExtractor", "Attention", "build_prefix_extractor", "fit_prefix"]

_F64 = torch.float64
# per family, relative to layer i of the party's slice: the maps producing q, k, v (one fused
# map for GPT-2), the map reading the attention output, the norm whose output the first ones
# read ({p}: the previous layer; BERT is post-norm), whether keys and queries are rotated
_FAMILIES: dict[str, tuple[tuple[str, ...], str, str, bool]] = {
    "llama": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
        "layers.{i}.input_layernorm",
        True,
    ),
    "gpt2": (("attn.c_attn",), "attn.c_proj", "layers.{i}.ln_1", False),
    "bert": (
        ("attention.self.query", "attention.self.key", "attention.self.value"),
        "attention.output.dense",
        "layers.{p}.output.LayerNorm",
        False,
    ),
}
_FIRST_NORM = {"bert": "embedding.embeddings.LayerNorm"}


def _normed(u: Tensor, gamma: Tensor, beta: Tensor | None) -> Tensor:
    """A norm's output x from its operand u = x/c (any c > 0 per row): (n, d) -> (n, d).

    RMSNorm: x = γ ⊙ v / rms(v), v = u/γ (rms(x/γ) = 1, ε ignored). LayerNorm: x = c'·u with c'
    from (x − β)/γ having mean 0 and variance 1.
    """
    tiny = torch.finfo(_F64).tiny
    if beta is None:
        return u / (u / gamma).pow(2).mean(1, keepdim=True).sqrt().clamp_min(tiny)
    return u * layer_norm_scale(u / gamma, beta / gamma)


@dataclass(frozen=True)
class _Layer:
    """One prefixed layer as the attacker reads it."""

    name: str  # layers.{i}
    qkv: tuple[int, ...]  # map ids producing q, k, v (one fused map for GPT-2)
    out: int  # map id reading the attention output
    weights: tuple[tuple[Tensor, Tensor | None], ...]  # per qkv map: (out, in) W, (out,) bias
    gamma: Tensor  # (d_model,) of the norm the qkv maps read
    beta: Tensor | None  # (d_model,), None for an RMSNorm
    init: Tensor  # (2, H_kv, P, d): the public initial keys and values


def _check_layout(
    passes: Sequence[Mapping[int, Tensor]], masks: Sequence[Tensor] | None, read: set[int]
) -> None:
    """Raise ValueError unless every pass comes with a (B, T) mask of the B·T rows of each map
    in ``read`` (other maps may see fewer rows, e.g. BERT's [CLS]-only pooler)."""
    if masks is None or len(masks) != len(passes):
        got = "none" if masks is None else len(masks)
        raise ValueError(
            f"prefix extraction needs each pass's (B, T) padding mask: {len(passes)} passes, "
            f"masks: {got}"
        )
    for n, (operands, mask) in enumerate(zip(passes, masks, strict=True)):
        rows = {t.shape[0] for i, t in operands.items() if i in read}  # B·T each
        if rows - {mask.numel()}:
            raise ValueError(
                f"prefix extraction: pass {n} has {sorted(rows)} operand rows, its mask "
                f"{tuple(mask.shape)} lays out {mask.numel()}"
            )


class PrefixExtractor:
    """Recovers every layer's P-tuning v2 prefix from forward passes (see the module docstring).

    Args:
        party: The attacker's rebuild of the party (public model, seeded prefix, no offload).
        layers: The prefixed layers, in order.
        qkv_paths: The q/k/v maps' paths in a layer (scoring hooks them in the clear).
        causal: Whether tokens see only earlier tokens.
        rotary: Whether queries and keys are rotated (LLaMA).
        rhos: Prior strength per round (:func:`fit_prefix`).
        iters: Most L-BFGS iterations per layer.
    """

    rank = 0  # a prefix is not low-rank: the random guess is a Gaussian of the right norm

    def __init__(
        self,
        party: ShieldedParty,
        layers: Sequence[_Layer],
        qkv_paths: Sequence[str],
        *,
        causal: bool,
        rotary: bool,
        rhos: Sequence[float] = RHOS,
        iters: int = 300,
    ) -> None:
        self.party, self.layers = party, list(layers)
        self.causal, self.rotary, self.rhos, self.iters = causal, rotary, tuple(rhos), iters
        self.qkv_paths = tuple(qkv_paths)
        self.heads = int(party.whole.config.num_attention_heads)
        _, self.kv_heads, self.num_virtual_tokens, self.head_dim = self.layers[0].init.shape
        self._init_state = party.adapter.state_dict()

    @property
    def names(self) -> list[str]:
        """The layers it attacks (every prefixed layer)."""
        return [layer.name for layer in self.layers]

    adapted = names

    def _heads(self, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q (B, H, T, d), k and v (B, H_kv, T, d) from the projections
        y = [q | k | v] (B·T, (H + 2·H_kv)·d), rotated at positions P + t where the family
        rotates."""
        b, t = mask.shape
        d, widths = self.head_dim, [self.heads, self.kv_heads, self.kv_heads]
        q, k, v = (
            part.reshape(b, t, -1, d).transpose(1, 2)  # (B, heads, T, d)
            for part in y.split([w * d for w in widths], dim=1)
        )
        if self.rotary:
            pos = (torch.arange(t) + self.num_virtual_tokens)[None]  # (1, T)
            cos, sin = self.party.whole.shared["rotary_emb"](torch.zeros(1, t, 1), pos)
            cos, sin = cos.to(_F64)[:, None], sin.to(_F64)[:, None]  # (1, 1, T, d)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q, k, v

    def _read(self, layer: _Layer, operands: Mapping[int, Tensor], mask: Tensor) -> Attention:
        """One pass's rows of (★) for ``layer``, from the operands of its q/k/v maps."""
        parts = []
        for map_id, (weight, bias) in zip(layer.qkv, layer.weights, strict=True):
            x = _normed(operands[map_id].to(_F64), layer.gamma, layer.beta)  # (B·T, d_model)
            parts.append(x @ weight.T if bias is None else x @ weight.T + bias)
        return token_rows(*self._heads(torch.cat(parts, dim=1), mask), mask, self.causal)

    def __call__(
        self, passes: Sequence[Mapping[int, Tensor]], masks: Sequence[Tensor] | None = None
    ) -> dict[str, Tensor]:
        """``{layers.i.key / layers.i.value: (H_kv, P, d) ΔK̂ / ΔV̂}``, the recovered prefix
        minus the public one, from forward passes under one adapter state.

        Args:
            passes: ``{map id: (n, d_in) operand rows}`` per forward pass.
            masks: Per pass, the (B, T) padding mask of its batch (B·T = n).

        Raises:
            ValueError: No mask per pass, or a mask that does not fit the pass's rows.
            KeyError: A pass lacks the operand of a map the attack reads.
        """
        _check_layout(passes, masks, {i for layer in self.layers for i in (*layer.qkv, layer.out)})
        out = {}
        for layer in self.layers:
            batches = zip(passes, masks, strict=True)
            rows = join_rows([self._read(layer, ops, mask) for ops, mask in batches])
            seen = torch.cat([ops[layer.out] for ops in passes])  # (N, H·d)
            est = fit_prefix(rows, seen, layer.init, rhos=self.rhos, iters=self.iters)
            out[f"{layer.name}.key"], out[f"{layer.name}.value"] = est - layer.init
        return out

    def _prefixes(self, state: Mapping[str, Tensor]) -> list[Tensor]:
        """Per layer, the (2, H_kv, P, d) keys and values of an adapter state."""
        adapter = self.party.adapter
        adapter.load_state_dict(dict(state))
        try:
            with torch.no_grad():
                return [torch.stack([k[0], v[0]]).to(_F64) for k, v in adapter.prefix_kv(1)]
        finally:
            adapter.load_state_dict(self._init_state)

    def deltas(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The true ΔK = K − K₀ and ΔV = V − V₀ of an adapter state, named as the estimates."""
        out = {}
        for layer, prefix in zip(self.layers, self._prefixes(state), strict=True):
            out[f"{layer.name}.key"], out[f"{layer.name}.value"] = prefix - layer.init
        return out

    def _clear_rows(
        self, state: Mapping[str, Tensor], batches: Sequence[Mapping[str, Tensor]]
    ) -> list[Attention]:
        """Per layer, the rows of (★) on ``batches`` in the victim's float model with ``state``
        (its clear q, k, v projections, hooked): the reference for :meth:`scores`."""
        seen: dict[tuple[int, int], Tensor] = {}
        hooks = [
            self.party.whole.get_submodule(f"{layer.name}.{path}").register_forward_hook(
                lambda _m, _a, y, key=(i, j): seen.__setitem__(key, y.detach())
            )
            for i, layer in enumerate(self.layers)
            for j, path in enumerate(self.qkv_paths)
        ]
        rows: list[list[Attention]] = [[] for _ in self.layers]
        self.party.adapter.load_state_dict(dict(state))
        try:
            for batch in batches:
                self.party.logits(dict(batch))
                mask = batch["attention_mask"]
                for i, layer_rows in enumerate(rows):
                    parts = [seen[i, j].flatten(0, -2) for j in range(len(self.qkv_paths))]
                    qkv = self._heads(torch.cat(parts, dim=1).to(_F64), mask)
                    layer_rows.append(token_rows(*qkv, mask, self.causal))
        finally:
            self.party.adapter.load_state_dict(self._init_state)
            for hook in hooks:
                hook.remove()
        return [join_rows(layer_rows) for layer_rows in rows]

    def scores(
        self,
        est: Mapping[str, Tensor],
        guess: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        holdout: Sequence[Mapping[str, Tensor]],
    ) -> list[dict[str, Any]]:
        """Rows beyond the relative error and cosine of the whole (ΔK, ΔV): each part's
        relative error, and the ``attention_error`` on ``holdout`` batches (module docstring),
        each with the public start's score (``chance``, 1.0) and ``guess``'s.

        Args:
            est: The recovered ΔK, ΔV (:meth:`__call__`).
            guess: A random guess of the same names and shapes.
            state: The true adapter state.
            holdout: Batches the attack never saw (none: no ``attention_error`` row).
        """
        true = self.deltas(state)
        out = [
            {
                "metric": f"{part}_relative_error",
                "value": relative_error(_part(est, part), _part(true, part)),
                "chance": 1.0,
                "random_guess": relative_error(_part(guess, part), _part(true, part)),
            }
            for part in ("key", "value")
        ]
        if holdout:
            rows, truth = self._clear_rows(state, holdout), self._prefixes(state)
            real = torch.cat([b["attention_mask"].flatten().bool() for b in holdout])  # (N,)
            out.append(
                {
                    "metric": "attention_error",
                    "value": self._effect_error(est, rows, truth, real),
                    "chance": 1.0,
                    "random_guess": self._effect_error(guess, rows, truth, real),
                }
            )
        return out

    def _effect_error(
        self,
        deltas: Mapping[str, Tensor],
        rows: Sequence[Attention],
        truth: Sequence[Tensor],
        real: Tensor,
    ) -> float:
        """‖o(K₀ + ΔK̂, V₀ + ΔV̂) − o(K, V)‖ / ‖o(K₀, V₀) − o(K, V)‖ over every layer's ``rows``
        of real tokens (``real``: (N,) bool), the true (2, H_kv, P, d) prefixes ``truth``."""
        num = den = 0.0
        for layer, attn, (keys, values) in zip(self.layers, rows, truth, strict=True):
            want = attn.output(keys, values)[real]  # (N', H, d)
            start = attn.output(layer.init[0], layer.init[1])[real]  # (N', H, d)
            moved = layer.init + torch.stack(
                [deltas[f"{layer.name}.key"], deltas[f"{layer.name}.value"]]
            )  # (2, H_kv, P, d)
            got = attn.output(moved[0], moved[1])[real]  # (N', H, d)
            num += float((got - want).pow(2).sum())
            den += float((start - want).pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else float("inf")


def _part(deltas: Mapping[str, Tensor], part: str) -> dict[str, Tensor]:
    """The ``key`` or ``value`` entries of ``{layers.i.key / layers.i.value: tensor}``."""
    return {name: t for name, t in deltas.items() if name.endswith(f".{part}")}


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding (LLaMA's ``apply_rotary_pos_emb``): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def build_prefix_extractor(
    model: str,
    adapter: Mapping[str, Any],
    *,
    task: str = "seq-cls",
    num_labels: int | None = 2,
    seed: int = 0,
    w_bits: int | None = 12,
    rhos: Sequence[float] = RHOS,
    iters: int = 300,
) -> PrefixExtractor:
    """The attacker's rebuild of the party's prefixed model, and the layers it reads.

    Args:
        model: The public model (preset or folder).
        adapter: The adapter's settings, ``method`` included.
        task: The party's task.
        num_labels: Its classes (seq-cls).
        seed: The party's public seed (its prefix's initialisation).
        w_bits: Bits of the integer weights the accelerator multiplies by (None: float W).
        rhos: Prior strength per round (:func:`fit_prefix`).
        iters: Most L-BFGS iterations per layer.

    Returns:
        The extractor.

    Raises:
        ConfigError: Not a prefix adapter, or a model family it does not read.
    """
    if adapter.get("method") != "prefix":
        raise ConfigError(
            f"prefix extraction: method {adapter.get('method')!r} is not attacked (P-tuning v2 "
            "'prefix' only; LoRA: lora-extraction)"
        )
    party = public_party(model, adapter, task=task, num_labels=num_labels, seed=seed, w_bits=w_bits)
    family = party.whole.family.name
    if family not in _FAMILIES:
        raise ConfigError(
            f"prefix extraction: model family {family!r} is not read; accepted: "
            f"{', '.join(_FAMILIES)}"
        )
    qkv_paths, out_path, norm_path, rotary = _FAMILIES[family]
    maps = offloaded_maps(party)
    with torch.no_grad():
        init = [torch.stack([k[0], v[0]]).to(_F64) for k, v in party.adapter.prefix_kv(1)]
    layers = []
    for i, prefix in enumerate(init):
        path = _FIRST_NORM[family] if i == 0 and "{p}" in norm_path else norm_path
        norm = party.whole.get_submodule(path.format(i=i, p=i - 1))
        beta = getattr(norm, "bias", None)
        names = [f"layers.{i}.{p}" for p in qkv_paths]
        layers.append(
            _Layer(
                f"layers.{i}",
                tuple(maps[n][0] for n in names),
                maps[f"layers.{i}.{out_path}"][0],
                tuple(accelerator_weight(maps[n][1], w_bits) for n in names),
                norm.weight.detach().to(_F64),
                None if beta is None else beta.detach().to(_F64),
                prefix.contiguous(),
            )
        )
    return PrefixExtractor(
        party,
        layers,
        qkv_paths,
        causal=party.whole.family.causal,
        rotary=rotary,
        rhos=rhos,
        iters=iters,
    )


register_attack(
    name="prefix-extraction",
    surface="accelerator",
    summary="P-tuning v2 key/value prefixes by fitting each layer's attention to its operands",
    build=build_prefix_extractor,
)
