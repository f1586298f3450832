"""What a model family must tell the slicer: where its parts are and how a layer is called.

A family never re-implements a layer: it only knows where the Hugging Face model keeps its
embeddings, layers, final norm and head, and how to call a layer with the masks and position
information that :mod:`shieldtune.models.masks` builds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from shieldtune.models.masks import last_token_index

__all__ = ["Family", "KVGeometry", "TaskKind", "task_of", "decoder_head"]

TaskKind = Literal["seq-cls", "causal-lm"]


@dataclass(frozen=True)
class KVGeometry:
    """Shape of the key/value states a layer attends over (what a prefix must match)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """Width of one layer's key (or value) for one position: heads × head_dim."""
        return self.num_kv_heads * self.head_dim


def task_of(model: nn.Module) -> TaskKind:
    """Tell a causal-LM model from a sequence-classification one by its head.

    Args:
        model: A Hugging Face ``*ForCausalLM`` / ``*LMHeadModel`` or ``*ForSequenceClassification``.

    Returns:
        ``"causal-lm"`` or ``"seq-cls"``.
    """
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "seq-cls"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    raise ValueError(f"model class {name} is neither a causal LM nor a sequence classifier")


def decoder_head(
    norm: nn.Module,
    head: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    task: TaskKind,
) -> torch.Tensor:
    """Final norm, then the LM head on every position or the class head on the last real token.

    Args:
        norm: The final norm (RMSNorm / LayerNorm).
        head: ``lm_head`` (causal-lm) or ``score`` (seq-cls).
        hidden: (B, T, d) last hidden states.
        attention_mask: (B, T) right-padding mask.
        task: ``causal-lm`` or ``seq-cls``.

    Returns:
        (B, T, V) or (B, C) logits.
    """
    hidden = norm(hidden)  # (B, T, d)
    if task == "causal-lm":
        return head(hidden)  # (B, T, V)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    pooled = hidden[rows, last_token_index(attention_mask)]  # (B, d)
    return head(pooled)  # (B, C)


class Family(ABC):
    """How one family of Hugging Face models is laid out.

    Subclasses are stateless; the slicer passes the model (or the modules it registered).
    """

    name: str
    model_types: tuple[str, ...]
    causal: bool
    layers_path: str  # dotted path of the layer list inside the task model, e.g. "model.layers"

    @abstractmethod
    def body(self, model: nn.Module) -> nn.Module:
        """The base transformer inside the task model (``model.model``...)."""

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The list of transformer layers."""
        return getattr(self.body(model), self.layers_path.rsplit(".", 1)[-1])

    @abstractmethod
    def embed_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules the front slice needs to embed tokens."""

    def shared_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Parameter-free modules both slices need (e.g. rotary embeddings)."""
        return {}

    @abstractmethod
    def head_modules(self, model: nn.Module, task: TaskKind) -> dict[str, nn.Module]:
        """Modules the back slice needs after the last layer (final norm, head, pooler)."""

    @abstractmethod
    def embed(
        self,
        mods: nn.ModuleDict,
        input_ids: torch.Tensor,
        pos_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> hidden states (B, T, d)."""

    def layer_extras(
        self, mods: nn.ModuleDict, hidden: torch.Tensor, pos_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Per-forward keyword arguments every layer needs (rotary cos/sin...)."""
        return {}

    @abstractmethod
    def run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        extras: dict[str, Any],
    ) -> torch.Tensor:
        """One layer: (B, T, d) -> (B, T, d), with the (B, 1, T, P+T) additive mask."""

    @abstractmethod
    def head(
        self,
        mods: nn.ModuleDict,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        task: TaskKind,
    ) -> torch.Tensor:
        """Last hidden states (B, T, d) -> logits: (B, T, V) for causal LM, (B, C) for seq-cls."""

    @abstractmethod
    def kv_geometry(self, config: Any) -> KVGeometry:
        """Key/value geometry of the model's attention."""
