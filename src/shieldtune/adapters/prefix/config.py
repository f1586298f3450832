"""P-tuning v2 settings (validated once, at the edge)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PrefixSettings"]


class PrefixSettings(BaseModel):
    """Trainable key/value prefixes at every layer of a slice (P-tuning v2 / deep prefix)."""

    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="prefix length P")
    projection: bool = Field(False, description="reparameterise the prefix through a 2-layer MLP")
    projection_hidden: int | None = Field(
        None, ge=1, description="hidden width of the reparameterisation MLP (default: token dim)"
    )
    init_std: float = Field(0.02, gt=0, description="std of the prefix initialisation")
