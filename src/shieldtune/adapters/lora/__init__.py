"""LoRA: low-rank adapters on frozen linear maps (PEFT-injected, PEFT-format export)."""

from shieldtune.adapters.base import register_adapter
from shieldtune.adapters.lora.config import LoraSettings
from shieldtune.adapters.lora.model import LoraAdapter, attach_lora, peft_task_type

__all__ = ["LoraSettings", "LoraAdapter", "attach_lora", "peft_task_type"]

register_adapter(name="lora", config_cls=LoraSettings, attach=attach_lora, prefix="lora_")
