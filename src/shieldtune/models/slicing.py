"""Model slicing: split a Hugging Face transformer at layer k into a front and a back slice.

``front = ModelSlice(model, 0, k, embed=True)`` maps token ids to the cut-layer hidden states;
``back = ModelSlice(model, k, L, head=True)`` maps them to logits; ``back(front(x))`` equals the
full model. ``ModelSlice(model, 0, L, embed=True, head=True)`` *is* the full model, so the local
baseline and the split modes run the same forward code. Slices hold references to the model's
own modules (a slice's parameters are the model's parameters); deep-copy a slice to move it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from shieldtune.errors import ModelError
from shieldtune.models.families import Family, TaskKind, family_of, task_of
from shieldtune.models.masks import additive_mask, position_ids

__all__ = ["ModelSlice", "PrefixProvider", "slice_model", "full_slice", "unwrap"]


class PrefixProvider(Protocol):
    """A trainable key/value prefix for the layers of one slice (P-tuning v2)."""

    num_virtual_tokens: int

    def prefix_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slice layer, the (B, H_kv, P, head_dim) key and value prefixes."""
        ...


class _PrefixCache:
    """The cache object attention layers call ``update`` on: prepends the layer's prefix."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.kv = kv

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pk, pv = self.kv[layer_idx]  # (B, H_kv, P, Dh) each
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)  # (B, H_kv, P+T, Dh)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _layer_idx(layer: nn.Module, fallback: int) -> int:
    for module in layer.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            return idx
    return fallback


class ModelSlice(nn.Module):
    """Layers ``start..end-1`` of a model, optionally with its embeddings and/or its head.

    Args:
        model: A Hugging Face causal-LM or sequence-classification model (PEFT-wrapped is fine).
        start: First layer of the slice (0-based).
        end: One past the last layer of the slice.
        embed: Whether the slice starts from token ids (the front slice).
        head: Whether the slice ends with final norm + head (the back slice).

    Raises:
        ModelError: Unknown family, or a layer range outside ``0 <= start <= end <= L``.
    """

    def __init__(
        self, model: nn.Module, start: int, end: int, *, embed: bool = False, head: bool = False
    ) -> None:
        super().__init__()
        hf = unwrap(model)
        family = family_of(hf)
        all_layers = family.layers(hf)
        n = len(all_layers)
        if not (0 <= start <= end <= n):
            raise ModelError(f"layer range {start}..{end} is outside the model's 0..{n} layers")
        self.family: Family = family
        self.task: TaskKind = task_of(hf)
        self.config = hf.config
        self.start, self.end = start, end
        self.has_embed, self.has_head = embed, head
        self.layers = nn.ModuleList(all_layers[start:end])
        self.layer_ids = [_layer_idx(layer, start + i) for i, layer in enumerate(self.layers)]
        self.shared = nn.ModuleDict(family.shared_modules(hf))
        self.embedding = nn.ModuleDict(family.embed_modules(hf) if embed else {})
        self.head_mods = nn.ModuleDict(family.head_modules(hf, self.task) if head else {})
        self.prefix: PrefixProvider | None = None

    @property
    def num_layers(self) -> int:
        """Number of transformer layers in this slice."""
        return len(self.layers)

    def set_prefix(self, prefix: PrefixProvider | None) -> None:
        """Attach (or remove) a trainable key/value prefix for this slice's layers."""
        if isinstance(prefix, nn.Module):
            self.prefix_module = prefix  # registered so its parameters belong to the slice
        elif hasattr(self, "prefix_module"):
            del self.prefix_module
        self.prefix = prefix

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the slice.

        Args:
            x: (B, T) token ids if the slice embeds, else (B, T, d) hidden states.
            attention_mask: (B, T), 1 for real tokens, 0 for (right) padding.
            token_type_ids: (B, T) segment ids for text pairs (BERT), or None.

        Returns:
            (B, T, d) hidden states, or logits if the slice has the head.
        """
        prefix_len = self.prefix.num_virtual_tokens if self.prefix is not None else 0
        pos = position_ids(attention_mask, prefix_len=prefix_len)  # (1, T)
        if self.has_embed:
            hidden = self.family.embed(self.embedding, x, pos, token_type_ids)  # (B, T, d)
        else:
            hidden = x  # (B, T, d)
        if self.layers:
            hidden = self._run_layers(hidden, attention_mask, pos, prefix_len)  # (B, T, d)
        if self.has_head:
            return self.family.head(self.head_mods, hidden, attention_mask, self.task)
        return hidden

    def _run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor, prefix_len: int
    ) -> torch.Tensor:
        causal = self.family.causal
        mask = additive_mask(
            attention_mask, causal=causal, prefix_len=prefix_len, dtype=hidden.dtype
        )
        extras = self.family.layer_extras(self.shared, hidden, pos)
        cache = None
        if self.prefix is not None:
            kv = self.prefix.prefix_kv(hidden.shape[0])  # per layer: 2 × (B, H_kv, P, Dh)
            cache = _PrefixCache(
                {
                    i: (k.to(hidden.dtype), v.to(hidden.dtype))
                    for i, (k, v) in zip(self.layer_ids, kv, strict=True)
                }
            )
        for layer in self.layers:
            hidden = self.family.run_layer(layer, hidden, mask, cache, extras)  # (B, T, d)
        return hidden


def slice_model(model: nn.Module, cut: int) -> tuple[ModelSlice, ModelSlice]:
    """Split ``model`` after layer ``cut`` (0 ≤ cut ≤ L).

    Args:
        model: A Hugging Face model of a supported family.
        cut: Number of layers the front slice runs (0 = embeddings only).

    Returns:
        ``(front, back)``: front maps token ids to (B, T, d); back maps those to logits.

    Raises:
        ModelError: The family is unknown or the cut is out of range.
    """
    hf = unwrap(model)
    n = len(family_of(hf).layers(hf))
    if not isinstance(cut, int) or not (0 <= cut <= n):
        raise ModelError(f"cut layer {cut!r} is out of range: this model has {n} layers (0..{n})")
    return ModelSlice(model, 0, cut, embed=True), ModelSlice(model, cut, n, head=True)


def full_slice(model: nn.Module) -> ModelSlice:
    """The whole model as one slice (embeddings + every layer + head)."""
    hf = unwrap(model)
    return ModelSlice(model, 0, len(family_of(hf).layers(hf)), embed=True, head=True)
