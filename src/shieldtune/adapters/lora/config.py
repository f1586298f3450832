"""LoRA settings (validated once, at the edge)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LoraSettings"]


class LoraSettings(BaseModel):
    """Low-rank adapters on frozen linear maps: W x + (alpha / r) · B A x."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is alpha / r · BA")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input")
    target_modules: list[str] | None = Field(
        None, description="module name suffixes to adapt; None = PEFT's default for the family"
    )
