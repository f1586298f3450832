"""LoRA on one slice, injected with PEFT and saved in the format ``PeftModel`` loads."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, TaskType, inject_adapter_in_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from shieldtune.adapters.base import (
    NamedParamsAdapter,
    freeze,
    head_parameters,
    write_peft_folder,
)
from shieldtune.adapters.lora.config import LoraSettings
from shieldtune.errors import ConfigError
from shieldtune.models.slicing import ModelSlice

__all__ = ["LoraAdapter", "attach_lora", "peft_task_type"]


def peft_task_type(slice_: ModelSlice) -> TaskType:
    """PEFT's task type for the slice's task."""
    return TaskType.SEQ_CLS if slice_.task == "seq-cls" else TaskType.CAUSAL_LM


class LoraAdapter(NamedParamsAdapter):
    """LoRA matrices injected (by PEFT) into the linear layers of one slice.

    Args:
        slice_: The slice whose layers are adapted (its modules are modified in place).
        model: The Hugging Face model the slice was cut from (for names in the PEFT export).
        settings: Rank, alpha, dropout, target modules.
    """

    method = "lora"

    def __init__(self, slice_: ModelSlice, model: nn.Module, settings: LoraSettings) -> None:
        model_type = slice_.config.model_type
        targets = settings.target_modules or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
            model_type
        )
        if not targets:
            raise ConfigError(
                f"lora.target_modules: no default for model type {model_type!r}; set it"
            )
        self.peft_config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=list(targets),
            layers_to_transform=list(range(slice_.start, slice_.end)) or None,
            task_type=peft_task_type(slice_),
        )
        self.slice = slice_
        self.model = model
        freeze(slice_)
        if slice_.num_layers > 0:
            try:
                inject_adapter_in_model(_local_config(self.peft_config), slice_.layers)
            except ValueError as err:
                raise ConfigError(f"lora.target_modules: {err}") from None
        self._lora = {n: p for n, p in slice_.layers.named_parameters() if "lora_" in n}
        self._head = head_parameters(slice_)
        for p in [*self._lora.values(), *self._head]:
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self._lora.values(), *self._head]

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel``."""
        head_names = sorted({n.rsplit(".", 1)[0] for n in self._named() if "lora_" not in n})
        config = LoraConfig(**{**self.peft_config.to_dict(), "peft_type": None})
        config.base_model_name_or_path = base_model
        config.modules_to_save = head_names or None
        config.inference_mode = True
        tensors = {
            f"base_model.model.{n.replace('.default', '')}": p for n, p in self._named().items()
        }
        write_peft_folder(out_dir, config, tensors)


def _local_config(config: LoraConfig) -> LoraConfig:
    """The same config for injection into a bare layer list (indices restart at 0 there)."""
    return LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
    )


def attach_lora(slice_: ModelSlice, model: nn.Module, settings: LoraSettings) -> LoraAdapter:
    """Inject LoRA into ``slice_`` (see :class:`LoraAdapter`)."""
    return LoraAdapter(slice_, model, settings)
