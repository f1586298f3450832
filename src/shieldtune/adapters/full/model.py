"""Full fine-tuning of a slice: every parameter trains; saved as safetensors under HF names."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from shieldtune.adapters.base import NamedParamsAdapter, freeze
from shieldtune.adapters.full.config import FullSettings
from shieldtune.models.slicing import ModelSlice

__all__ = ["FullAdapter", "attach_full"]


class FullAdapter(NamedParamsAdapter):
    """Not an adapter: the whole slice trains (the insecure accuracy ceiling)."""

    method = "full"

    def __init__(self, slice_: ModelSlice, model: nn.Module, settings: FullSettings) -> None:
        self.slice, self.model = slice_, model
        freeze(slice_)
        for name, p in slice_.named_parameters():
            if settings.train_embeddings or not name.startswith("embedding."):
                p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.slice.parameters() if p.requires_grad]

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write the trained weights as ``model.safetensors`` (HF parameter names)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(
            tensors,
            str(out_dir / "model.safetensors"),
            metadata={"format": "pt", "base_model": base_model},
        )


def attach_full(slice_: ModelSlice, model: nn.Module, settings: FullSettings) -> FullAdapter:
    """Make the whole slice trainable (see :class:`FullAdapter`)."""
    return FullAdapter(slice_, model, settings)
