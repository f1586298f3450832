"""GPT-2 family: learned absolute positions, pre-LayerNorm blocks, Conv1D projections."""

from __future__ import annotations

from typing import Any

from torch import nn

from shieldtune.models.families.base import Family, KVGeometry, TaskKind, decoder_head

__all__ = ["GPT2Family"]


class GPT2Family(Family):
    """Models laid out as ``transformer.{wte, wpe, drop, h, ln_f}``."""

    name = "gpt2"
    model_types = ("gpt2",)
    causal = True
    layers_path = "transformer.h"

    def body(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def embed_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        body = self.body(model)
        return {"wte": body.wte, "wpe": body.wpe, "drop": body.drop}

    def head_modules(self, model: nn.Module, task: TaskKind) -> dict[str, nn.Module]:
        head = model.lm_head if task == "causal-lm" else model.score
        return {"ln_f": self.body(model).ln_f, "head": head}

    def embed(self, mods, input_ids, pos_ids, token_type_ids):
        hidden = mods["wte"](input_ids) + mods["wpe"](pos_ids)  # (B, T, d)
        if token_type_ids is not None:
            hidden = hidden + mods["wte"](token_type_ids)  # (B, T, d)
        return mods["drop"](hidden)  # (B, T, d)

    def run_layer(self, layer, hidden, mask, cache, extras):
        return layer(hidden, past_key_values=cache, attention_mask=mask)  # (B, T, d)

    def head(self, mods, hidden, attention_mask, task):
        return decoder_head(mods["ln_f"], mods["head"], hidden, attention_mask, task)

    def kv_geometry(self, config: Any) -> KVGeometry:
        return KVGeometry(config.n_layer, config.n_head, config.n_embd // config.n_head)
