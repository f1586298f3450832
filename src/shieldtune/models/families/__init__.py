"""Model families the slicer knows, resolved by ``config.model_type`` through a closed registry."""

from __future__ import annotations

from torch import nn

from shieldtune.errors import ModelError
from shieldtune.models.families.base import Family, KVGeometry, TaskKind, task_of
from shieldtune.models.families.bert import BertFamily
from shieldtune.models.families.gpt2 import GPT2Family
from shieldtune.models.families.llama import LlamaFamily
from shieldtune.registry import Registry

__all__ = ["Family", "KVGeometry", "TaskKind", "FAMILIES", "family_of", "task_of"]

FAMILIES: Registry[Family] = Registry("model family")
for _family in (LlamaFamily(), GPT2Family(), BertFamily()):
    for _model_type in _family.model_types:
        FAMILIES.register(_model_type, _family)


def family_of(model: nn.Module) -> Family:
    """Find the family of a Hugging Face model by its ``config.model_type``.

    Raises:
        ModelError: The model type is not supported; the message lists the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(
            f"unknown model family {model_type!r}; "
            f"supported model types: {', '.join(FAMILIES.names())}"
        )
    return FAMILIES.get(model_type)
