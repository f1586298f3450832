"""P-tuning v2: per-layer key/value prefixes for one slice, in PEFT's prefix-tuning layout.

The trainable tensor is PEFT's ``PrefixEncoder`` (an embedding of shape (P, 2·L·token_dim),
optionally reparameterised by an MLP). Layer i of the slice reads rows 2i (keys) and 2i+1
(values) of the (P, 2L, H_kv, head_dim) view, exactly as ``PeftModel.get_prompt`` does, so the
full-model export loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PrefixTuningConfig, TaskType
from peft.tuners.prefix_tuning import PrefixEncoder
from torch import nn

from shieldtune.adapters.base import (
    freeze,
    head_parameters,
    hf_names,
    load_named,
    write_peft_folder,
)
from shieldtune.adapters.prefix.config import PrefixSettings
from shieldtune.errors import ConfigError
from shieldtune.models.slicing import ModelSlice

__all__ = ["PrefixAdapter", "attach_prefix"]


class PrefixAdapter(nn.Module):
    """Trainable key/value prefixes for every layer of a slice.

    Args:
        slice_: The slice to extend; its frozen weights are not touched.
        model: The Hugging Face model the slice was cut from (names for the export).
        settings: Prefix length, optional reparameterisation MLP, init scale.
    """

    method = "prefix"

    def __init__(self, slice_: ModelSlice, model: nn.Module, settings: PrefixSettings) -> None:
        super().__init__()
        if slice_.num_layers == 0:
            raise ConfigError("adapter prefix: the slice has no layers to put a prefix on")
        geo = slice_.family.kv_geometry(slice_.config)
        self.num_virtual_tokens = settings.num_virtual_tokens
        self.num_layers = slice_.num_layers
        self.kv_heads, self.head_dim = geo.num_kv_heads, geo.head_dim
        self.peft_config = PrefixTuningConfig(
            task_type=TaskType.SEQ_CLS if slice_.task == "seq-cls" else TaskType.CAUSAL_LM,
            num_virtual_tokens=settings.num_virtual_tokens,
            token_dim=geo.token_dim,
            num_layers=slice_.num_layers,
            num_attention_heads=geo.num_kv_heads,
            encoder_hidden_size=settings.projection_hidden or geo.token_dim,
            prefix_projection=settings.projection,
        )
        freeze(slice_)
        self.encoder = PrefixEncoder(self.peft_config)
        with torch.no_grad():
            self.encoder.embedding.weight.normal_(0.0, settings.init_std)
        self.register_buffer("tokens", torch.arange(settings.num_virtual_tokens), persistent=False)
        self._slice, self._model = [slice_], [model]  # lists: not registered as submodules
        self._head = head_parameters(slice_)
        for p in self._head:
            p.requires_grad_(True)
        slice_.set_prefix(self)

    def prompt_embeddings(self) -> torch.Tensor:
        """The flat prefix PEFT saves: (P, 2·L·token_dim)."""
        return self.encoder(self.tokens)  # (P, 2·L·H_kv·Dh)

    def prefix_kv(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per slice layer, the (B, H_kv, P, Dh) key and value prefixes."""
        p, n, h, d = self.num_virtual_tokens, self.num_layers, self.kv_heads, self.head_dim
        flat = self.prompt_embeddings()  # (P, 2L·H·D)
        kv = flat.view(p, 2 * n, h, d).permute(1, 2, 0, 3)  # (2L, H, P, D)
        kv = kv.unsqueeze(1).expand(2 * n, batch_size, h, p, d)  # (2L, B, H, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(n)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self._head]

    def _named(self) -> dict[str, nn.Parameter]:
        names = hf_names(self._slice[0], self._model[0])
        named = {f"prefix.{n}": p for n, p in self.encoder.named_parameters()}
        named.update({names[id(p)]: p for p in self._head})
        return named

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {name: p.detach().clone() for name, p in self._named().items()}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # type: ignore[override]
        load_named(self._named(), state)

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write the prefix as PEFT's ``prompt_embeddings`` (+ the classification head).

        Only a prefix over every layer of the model is a PEFT prefix-tuning adapter; a partial
        slice's prefix is saved in the same layout with its layer range in the config.
        """
        config = PrefixTuningConfig(**{**self.peft_config.to_dict(), "peft_type": None})
        config.base_model_name_or_path = base_model
        config.inference_mode = True
        config.prefix_projection = False  # the saved tensor is the projected prefix
        names = hf_names(self._slice[0], self._model[0])
        head_names = sorted({names[id(p)].rsplit(".", 1)[0] for p in self._head})
        config.modules_to_save = head_names or None
        tensors = {"prompt_embeddings": self.prompt_embeddings()}
        tensors.update({f"base_model.{names[id(p)]}": p for p in self._head})
        write_peft_folder(out_dir, config, tensors)


def attach_prefix(slice_: ModelSlice, model: nn.Module, settings: PrefixSettings) -> PrefixAdapter:
    """Attach a P-tuning v2 prefix to ``slice_`` (see :class:`PrefixAdapter`)."""
    return PrefixAdapter(slice_, model, settings)
