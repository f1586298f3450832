"""SPF as a slice adapter: saliency-chosen sparse entries train; exported as a sparse delta."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shieldtune.adapters.base import head_parameters
from shieldtune.adapters.spf.config import SPFConfig
from shieldtune.adapters.spf.model import SparseDelta, SPFModel
from shieldtune.errors import ConfigError
from shieldtune.models.slicing import ModelSlice

__all__ = ["SPFAdapter", "attach_spf", "DELTA_FILE"]

DELTA_FILE = "spf_delta.safetensors"


class SPFAdapter:
    """Sparse fine-tuning of a slice's matmul weights (density ρ, chosen once by saliency).

    Args:
        slice_: The slice to fine-tune sparsely (usually the client's front slice).
        model: The model the slice was cut from (unused; kept for the uniform attach signature).
        settings: Density, saliency rule, warm-up batches, targets, seed.
        loss_fn: ``loss_fn(i)`` -> loss of warm-up batch ``i`` (the ``gradient`` rule needs it).
    """

    method = "spf"

    def __init__(
        self,
        slice_: ModelSlice,
        model: nn.Module,
        settings: SPFConfig,
        loss_fn: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        if settings.saliency == "gradient" and loss_fn is None:
            raise ConfigError(
                "spf.saliency: 'gradient' needs warm-up batches; use it in a "
                "recipe, or choose 'magnitude' or 'random'"
            )
        self.settings = settings
        self.slice = slice_
        self.spf = SPFModel.from_saliency(slice_, settings, loss_fn)
        self._head = head_parameters(slice_)
        for p in self._head:
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.spf.trainable_parameters(), *self._head]

    def delta(self) -> SparseDelta:
        """The sparse delta trained so far (indices + values per target weight)."""
        return self.spf.export_delta()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, entry in self.delta().entries.items():
            out[f"{name}.indices"] = entry.indices.clone()
            out[f"{name}.values"] = entry.values.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(zip(self.spf.indices, self.spf.trainable_parameters(), strict=True))
        expected = {f"{n}.{k}" for n in params for k in ("indices", "values")}
        if set(state) != expected:
            raise ConfigError(f"SPF state does not match: expected {len(expected)} tensors")
        with torch.no_grad():
            for name, values in params.items():
                if not torch.equal(state[f"{name}.indices"], self.spf.indices[name]):
                    raise ConfigError(f"SPF state for {name}: indices differ from this mask")
                values.copy_(state[f"{name}.values"])

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write ``spf_delta.safetensors`` (indices + values) and ``spf_config.json``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        delta = self.delta()
        delta.save(out_dir / DELTA_FILE)
        meta = {
            "method": "spf",
            "base_model": base_model,
            "slice": [self.slice.start, self.slice.end],
            "nnz": delta.nnz,
            "bytes": delta.nbytes(),
            **self.settings.model_dump(),
        }
        (out_dir / "spf_config.json").write_text(json.dumps(meta, indent=2))


def attach_spf(
    slice_: ModelSlice,
    model: nn.Module,
    settings: SPFConfig,
    loss_fn: Callable[[int], torch.Tensor] | None = None,
) -> SPFAdapter:
    """Choose SPF entries of ``slice_`` and make only them trainable (see :class:`SPFAdapter`)."""
    return SPFAdapter(slice_, model, settings, loss_fn)
