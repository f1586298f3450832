"""What every adapter method provides, its closed registry, and the PEFT-format writer.

An adapter attaches to a :class:`~shieldtune.models.ModelSlice` (the full model is a slice too)
and exposes only its own tensors: those are what later crosses a TEE boundary or a network, so
the state dicts here never contain frozen base weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import save_file
from torch import nn

from shieldtune.errors import ConfigError
from shieldtune.models.slicing import ModelSlice, unwrap
from shieldtune.registry import Registry

__all__ = [
    "Adapter",
    "AdapterEntry",
    "ADAPTERS",
    "register_adapter",
    "parse_config",
    "head_parameters",
    "hf_names",
    "write_peft_folder",
    "load_named",
    "freeze",
    "NamedParamsAdapter",
]


class Adapter(Protocol):
    """An adapter attached to one slice."""

    method: str

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (adapter tensors and, for seq-cls, the head)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors only, keyed by stable names."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors produced by :meth:`state_dict` (shapes and names must match)."""
        ...

    def save(self, out_dir: Path, *, base_model: str) -> None:
        """Write the adapter to ``out_dir`` (PEFT format where PEFT has one)."""
        ...


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter method: its config class and how it attaches to a slice."""

    name: str
    config_cls: type[BaseModel]
    attach: Callable[..., Adapter]
    prefix: str


ADAPTERS: Registry[AdapterEntry] = Registry("adapter method")


def register_adapter(
    *, name: str, config_cls: type[BaseModel], attach: Callable[..., Adapter], prefix: str
) -> None:
    """Register an adapter method (called once, at the end of its folder's ``__init__``).

    Raises:
        ValueError: The name is malformed or already registered.
    """
    ADAPTERS.register(name, AdapterEntry(name, config_cls, attach, prefix))


def parse_config(cls: type[BaseModel], data: dict[str, Any], where: str) -> Any:
    """Validate ``data`` into ``cls``; every problem becomes one line of a ConfigError.

    Raises:
        ConfigError: Naming ``where.field``, the bad value and what is accepted.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in (where, *e["loc"]))
            bad = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            problems.append(f"{field}: {e['msg']}{bad}")
        raise ConfigError(problems) from None


def head_parameters(slice_: ModelSlice) -> list[nn.Parameter]:
    """The classification head's parameters (trainable with every adapter); none for LMs."""
    if not slice_.has_head or slice_.task != "seq-cls":
        return []
    return list(slice_.head_mods["head"].parameters())


def hf_names(slice_: ModelSlice, model: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to the parameter's name in the Hugging Face model."""
    return {id(p): n for n, p in unwrap(model).named_parameters()}


def write_peft_folder(out_dir: Path, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_config.json`` (PEFT's own serialiser) and ``adapter_model.safetensors``.

    Args:
        out_dir: Folder to create or fill.
        config: A ``peft`` config object (``LoraConfig``, ``PrefixTuningConfig``).
        tensors: Tensors under PEFT's saved key names.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(out_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    # PEFT reads this file; keep it minimal and human-readable
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_named(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``params`` after checking names and shapes match exactly.

    Raises:
        ConfigError: A name is missing or unexpected, or a shape differs.
    """
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"adapter state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, p in params.items():
        if state[name].shape != p.shape:
            raise ConfigError(
                f"adapter tensor {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def freeze(slice_: ModelSlice) -> None:
    """Make every parameter of ``slice_`` frozen (adapters then enable their own)."""
    for p in slice_.parameters():
        p.requires_grad_(False)


class NamedParamsAdapter:
    """State plumbing shared by adapters whose tensors are parameters of the model itself.

    Subclasses set ``self.slice`` and ``self.model`` and implement ``trainable_parameters()``;
    tensors are named by their Hugging Face parameter names.
    """

    slice: ModelSlice
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        raise NotImplementedError

    def _named(self) -> dict[str, nn.Parameter]:
        names = hf_names(self.slice, self.model)
        return {names[id(p)]: p for p in self.trainable_parameters()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors only, keyed by Hugging Face parameter names."""
        return {name: p.detach().clone() for name, p in self._named().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors produced by :meth:`state_dict` (names and shapes must match)."""
        load_named(self._named(), state)
