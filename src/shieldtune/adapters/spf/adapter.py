"""SPF as a slice adapter: saliency-chosen sparse entries train; exported as a sparse delta.

Federated (several split clients, each with its own mask): :meth:`SPFAdapter.load_global`
sets the slice to base + a global delta whose support is the union of every client's mask;
the entries on this client's mask become its trainable values, the others are added to the
frozen weights. :meth:`SPFAdapter.whole_delta` is then the slice's whole difference from the
base (the global's entries off the mask plus the trained values), so averaging those deltas
is FedAvg of the front weights in sparse form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from shieldtune.adapters.base import head_parameters, hf_names, load_named
from shieldtune.adapters.spf.config import SPFConfig
from shieldtune.adapters.spf.layer import sparse_add
from shieldtune.adapters.spf.model import DeltaEntry, SparseDelta, SPFModel
from shieldtune.errors import ConfigError
from shieldtune.models.slicing import ModelSlice

__all__ = ["SPFAdapter", "attach_spf", "DELTA_FILE", "HEAD_FILE"]

DELTA_FILE = "spf_delta.safetensors"
HEAD_FILE = "head.safetensors"  # the dense classification head of a seq-cls model


class SPFAdapter:
    """Sparse fine-tuning of a slice's matmul weights (density ρ, chosen once by saliency).

    Args:
        slice_: The slice to fine-tune sparsely (usually the client's front slice).
        model: The model the slice was cut from (names the head's tensors).
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
        # the classification head trains densely with every adapter: never sparsified too (its
        # values would be a second, overlapping parameter of the same weight)
        self.spf = SPFModel.from_saliency(
            slice_, settings, loss_fn, exclude=head_parameters(slice_)
        )
        self._head = head_parameters(slice_)
        for p in self._head:
            p.requires_grad_(True)
        names = hf_names(slice_, model)
        self._head_named = {names[id(p)]: p for p in self._head}  # exported densely, as LoRA's
        self._base: dict[str, torch.Tensor] = {}  # weights before a global delta touched them
        self._off: dict[str, DeltaEntry] = {}  # the loaded global's entries off this mask

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.spf.trainable_parameters(), *self._head]

    def delta(self) -> SparseDelta:
        """The sparse delta trained so far (indices + values per target weight)."""
        return self.spf.export_delta()

    @torch.no_grad()
    def load_global(self, delta: SparseDelta) -> None:
        """Set the slice to base + ``delta``; train on from there (see the module docstring).

        Raises:
            IntegrityError: The delta is corrupt.
            ConfigError: A parameter is missing or differs in shape or dtype.
        """
        delta.validate()
        own = self.spf.indices  # name -> (nnz,) trained positions
        values = dict(zip(own, self.spf.trainable_parameters(), strict=True))
        for name in self._off:  # the previous global's off-mask entries go
            self.spf.base_weight(name).copy_(self._base[name])
        self._off = {}
        for name, v in values.items():
            if name not in delta.entries:
                v.zero_()
        for name, e in delta.entries.items():
            weight = self.spf.base_weight(name)
            if tuple(weight.shape) != tuple(e.shape) or weight.dtype != e.values.dtype:
                raise ConfigError(f"global SPF delta for {name}: {e.shape} does not fit")
            off = torch.ones(e.indices.numel(), dtype=torch.bool)  # (nnz,)
            if name in own:
                on = torch.isin(e.indices, own[name])  # (nnz,) entries on this mask
                v = torch.zeros_like(values[name])  # (m,)
                v[torch.searchsorted(own[name], e.indices[on])] = e.values[on]
                values[name].copy_(v)
                off = ~on
            if bool(off.any()):
                base = self._base.setdefault(name, weight.detach().clone())
                self._off[name] = DeltaEntry(e.indices[off], e.values[off], e.shape)
                weight.copy_(sparse_add(base, e.indices[off], e.values[off]))

    def whole_delta(self) -> SparseDelta:
        """The slice's whole difference from the base: the global's off-mask entries + the
        trained values (just :meth:`delta` until a global was loaded)."""
        entries = dict(self.delta().entries)
        for name, off in self._off.items():
            own = entries.get(name)
            if own is None:
                entries[name] = DeltaEntry(off.indices.clone(), off.values.clone(), off.shape)
                continue
            indices = torch.cat([own.indices, off.indices])  # disjoint supports
            order = torch.argsort(indices)
            values = torch.cat([own.values, off.values])[order]
            entries[name] = DeltaEntry(indices[order], values, own.shape)
        return SparseDelta(entries)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sparse delta (``<weight>.indices`` / ``.values``) and, for seq-cls, the dense
        classification head under its Hugging Face names."""
        out: dict[str, torch.Tensor] = {}
        for name, entry in self.delta().entries.items():
            out[f"{name}.indices"] = entry.indices.clone()
            out[f"{name}.values"] = entry.values.detach().clone()
        out.update({name: p.detach().clone() for name, p in self._head_named.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(zip(self.spf.indices, self.spf.trainable_parameters(), strict=True))
        expected = {f"{n}.{k}" for n in params for k in ("indices", "values")}
        if set(state) != expected | set(self._head_named):
            raise ConfigError(
                f"SPF state does not match: expected {len(expected) + len(self._head_named)} "
                "tensors (indices and values per sparsified weight, plus the head)"
            )
        with torch.no_grad():
            for name, values in params.items():
                if not torch.equal(state[f"{name}.indices"], self.spf.indices[name]):
                    raise ConfigError(f"SPF state for {name}: indices differ from this mask")
                values.copy_(state[f"{name}.values"])
        load_named(self._head_named, {n: state[n] for n in self._head_named})

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write ``spf_delta.safetensors`` (indices + values of :meth:`whole_delta`) and
        ``spf_config.json``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        delta = self.whole_delta()
        delta.save(out_dir / DELTA_FILE)
        if self._head_named:  # the dense classification head (seq-cls)
            save_file(
                {n: p.detach().contiguous().cpu() for n, p in self._head_named.items()},
                str(out_dir / HEAD_FILE),
                metadata={"format": "pt"},
            )
        meta = {
            "method": "spf",
            "base_model": base_model,
            "slice": [self.slice.start, self.slice.end],
            "nnz": delta.nnz,
            "head": HEAD_FILE if self._head_named else None,
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
