"""Full fine-tuning settings (the accuracy ceiling baseline)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FullSettings"]


class FullSettings(BaseModel):
    """Every weight of the slice trains."""

    model_config = ConfigDict(extra="forbid")

    train_embeddings: bool = Field(True, description="also train the token/position embeddings")
