"""BERT family (BERT, MiniLM): bidirectional encoder, post-LayerNorm layers, [CLS] pooler."""

from __future__ import annotations

from typing import Any

from torch import nn

from shieldtune.errors import ModelError
from shieldtune.models.families.base import Family, KVGeometry, TaskKind

__all__ = ["BertFamily"]


class BertFamily(Family):
    """Encoders laid out as ``bert.{embeddings, encoder.layer, pooler}`` + ``classifier``."""

    name = "bert"
    model_types = ("bert",)
    causal = False
    layers_path = "bert.encoder.layer"

    def body(self, model: nn.Module) -> nn.Module:
        return model.bert

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.body(model).encoder.layer

    def embed_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"embeddings": self.body(model).embeddings}

    def head_modules(self, model: nn.Module, task: TaskKind) -> dict[str, nn.Module]:
        if task != "seq-cls":
            raise ModelError("the bert family is an encoder: only task 'seq-cls' is supported")
        pooler = self.body(model).pooler
        if pooler is None:
            raise ModelError("this BERT model has no pooler; load it with add_pooling_layer=True")
        return {"pooler": pooler, "dropout": model.dropout, "head": model.classifier}

    def embed(self, mods, input_ids, pos_ids, token_type_ids):
        return mods["embeddings"](
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=pos_ids
        )  # (B, T, d)

    def run_layer(self, layer, hidden, mask, cache, extras):
        return layer(hidden, attention_mask=mask, past_key_values=cache)  # (B, T, d)

    def head(self, mods, hidden, attention_mask, task):
        pooled = mods["pooler"](hidden)  # (B, d), tanh(W · h[CLS])
        return mods["head"](mods["dropout"](pooled))  # (B, C)

    def kv_geometry(self, config: Any) -> KVGeometry:
        heads = config.num_attention_heads
        return KVGeometry(config.num_hidden_layers, heads, config.hidden_size // heads)
