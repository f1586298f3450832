"""LLaMA family (LLaMA, Qwen2, Mistral): RMSNorm, rotary embeddings, grouped-query attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from shieldtune.models.families.base import Family, KVGeometry, TaskKind, decoder_head

__all__ = ["LlamaFamily"]


class LlamaFamily(Family):
    """Decoder-only models laid out as ``model.{embed_tokens, layers, norm, rotary_emb}``."""

    name = "llama"
    model_types = ("llama", "qwen2", "mistral")
    causal = True
    layers_path = "model.layers"

    def body(self, model: nn.Module) -> nn.Module:
        return model.model

    def embed_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"embed_tokens": self.body(model).embed_tokens}

    def shared_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"rotary_emb": self.body(model).rotary_emb}

    def head_modules(self, model: nn.Module, task: TaskKind) -> dict[str, nn.Module]:
        head = model.lm_head if task == "causal-lm" else model.score
        return {"norm": self.body(model).norm, "head": head}

    def embed(self, mods, input_ids, pos_ids, token_type_ids):
        return mods["embed_tokens"](input_ids)  # (B, T, d)

    def layer_extras(self, mods, hidden, pos_ids):
        cos_sin = mods["rotary_emb"](hidden, position_ids=pos_ids)  # 2 × (1, T, head_dim)
        return {"position_embeddings": cos_sin, "position_ids": pos_ids}

    def run_layer(self, layer, hidden, mask, cache, extras):
        return layer(hidden, attention_mask=mask, past_key_values=cache, **extras)  # (B, T, d)

    def head(self, mods, hidden, attention_mask, task):
        return decoder_head(mods["norm"], mods["head"], hidden, attention_mask, task)

    def kv_geometry(self, config: Any) -> KVGeometry:
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)
